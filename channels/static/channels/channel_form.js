// The channel form follows the type chosen: only that type's help shows, and on a new channel the endpoints it can
// serve are ticked (an operator may still untick some).
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  const kind = document.getElementById("id_kind");
  if (!kind) return;
  const adding = document.body.classList.contains("add-form") || location.pathname.endsWith("/add/");
  const show = (changed) => {
    for (const help of document.querySelectorAll(".oo8-kind-help")) {
      const chosen = help.dataset.kind === kind.value;
      help.hidden = !chosen;
      if (chosen && changed && adding) {
        const served = help.dataset.endpoints.split(",");
        for (const box of document.querySelectorAll("input[name=endpoints]")) {
          box.checked = served.includes(box.value);
          box.disabled = !served.includes(box.value);
        }
      }
    }
  };
  kind.addEventListener("change", () => show(true));
  show(adding);
});
