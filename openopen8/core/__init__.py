"""The ground floor both apps stand on: the error type, the wire shapes, the model rules and the one outbound HTTP
seam. It imports neither ``channels`` nor ``gateway`` (``make lint`` checks it)."""
