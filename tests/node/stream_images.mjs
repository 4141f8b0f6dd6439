// Streams one image request through the official openai Node SDK and prints what the SDK yields, a JSON line an
// event, then {"error": ...} if the SDK raised. Usage: node stream_images.mjs BASE_URL KEY generate|edit FIELDS_JSON
import OpenAI, { toFile } from "openai";

const [baseURL, apiKey, endpoint, fields] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const body = { ...JSON.parse(fields), stream: true };
try {
  if (endpoint === "edit") {
    body.image = await toFile(Buffer.from(body.image, "base64"), "input.png", { type: "image/png" });
  }
  const events = endpoint === "edit" ? await client.images.edit(body) : await client.images.generate(body);
  for await (const event of events) {
    console.log(JSON.stringify(event));
  }
} catch (error) {
  const kind = error instanceof OpenAI.APIError ? "APIError" : error.constructor.name;
  console.log(JSON.stringify({ error: { kind, status: error.status ?? null, message: error.message,
                                        code: error.code ?? null } }));
}
