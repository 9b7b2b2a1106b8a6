// intracom from Node.js through the HTTP gateway: publish, subscribe (Server-Sent
// Events), request/reply. Plain `fetch` and a small SSE reader; no dependency.
//
//   cargo run --features gateway --example gateway      # prints a token, then serves
//   INTRACOM_TOKEN=<token> node examples/node/example.mjs
//
// INTRACOM_URL defaults to http://127.0.0.1:8080. The token acts as service `billing`.

const base = process.env.INTRACOM_URL ?? "http://127.0.0.1:8080";
const token = process.env.INTRACOM_TOKEN;
if (!token) {
  console.error("set INTRACOM_TOKEN (cargo run --features gateway --example gateway prints one)");
  process.exit(2);
}
const auth = { Authorization: `Bearer ${token}` };

// One JSON call; a non-2xx answer throws its `{code, message}`.
async function call(method, path, body, headers = {}) {
  const response = await fetch(base + path, {
    method,
    headers: { ...auth, "Content-Type": "application/json", ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${answer.code}: ${answer.message}`);
  return answer;
}

// Opens an event stream. The gateway answers once the subscription is anchored, so
// everything published after this resolves is delivered. `lastEventId` resumes after
// an event already seen (what EventSource sends on reconnect).
async function subscribe(path, { lastEventId, signal } = {}) {
  const headers = { ...auth, Accept: "text/event-stream" };
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  const response = await fetch(base + path, { headers, signal });
  if (!response.ok) throw new Error(`GET ${path}: ${response.status} ${await response.text()}`);
  return events(response.body);
}

// Server-Sent Events: `field: value` lines; a blank line ends an event; `:` starts a comment.
async function* events(body) {
  const decoder = new TextDecoder();
  let buffer = "";
  let event = { event: "message", id: null, data: [] };
  for await (const chunk of body) {
    buffer += decoder.decode(chunk, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (line === "") {
        if (event.data.length) yield { event: event.event, id: event.id, data: JSON.parse(event.data.join("\n")) };
        event = { event: "message", id: null, data: [] };
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") event.data.push(value);
        else if (field === "event") event.event = value;
        else if (field === "id") event.id = value;
      }
    }
  }
}

// 1. Subscribe to `reload` messages.
const stop = new AbortController();
const stream = await subscribe("/subscribe/reload", { signal: stop.signal });

// 2. Publish a broadcast. The Idempotency-Key becomes the message id: if this POST is
//    retried after a lost answer, the message is still stored once.
const key = `reload-tenant-7-${Date.now()}`;
const receipt = await call("POST", "/publish", { action: "reload", query: { tenant: 7 } }, { "Idempotency-Key": key });
console.log(`published ${receipt.id}: ${receipt.status}`);

// 3. Receive it. `id` is the event's position: keep it to resume with Last-Event-ID.
for await (const event of stream) {
  if (event.event !== "message") {
    console.log(`${event.event}: ${event.data.message}`);
    continue;
  }
  const m = event.data;
  console.log(`received ${m.action} from ${m.serviceNameSource}: ${JSON.stringify(m.query)} (resume after ${event.id.slice(0, 16)}…)`);
  if (m.id === receipt.id) break;
}
stop.abort();

// 4. Ask billing for an invoice and wait for the answer (504 if nobody answers in time).
const answer = await call("POST", "/request/billing/invoice.get?timeout_ms=5000", { invoice: 42 });
console.log(`invoice ${answer.result.invoice}: total ${answer.result.total}`);
