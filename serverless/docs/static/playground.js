// The playground: pick a hosted workflow (or drop/paste an API-format JSON), fill the form built
// from its parameter schema, run it over SSE (fetch + a stream reader: EventSource cannot POST),
// watch the progress bar, ComfyUI's messages and the outputs, cancel. A hosted workflow's versions
// and aliases can be picked (a trial run of `<id>@<n>`); each run shows the curl and Python client
// code of the very call it made. No build step, no CDN.
"use strict";

const KEY = "comfy-serverless-api-key";
const $ = (id) => document.getElementById(id);
const state = { workflowId: null, workflow: null, params: [], run: null, shown: new Set(), picks: 0 };

// A workflow ref in a path: `<id>@<n>` and `<id>@<alias>` keep their `@`, the rest is escaped.
const refPath = (ref) => encodeURIComponent(ref).replace(/%40/g, "@");

// -- HTTP: the API key (asked once, kept in this tab's session storage) ---------------------------
function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// Asks for a key (saying why when one was refused); true when one was saved, false on Cancel.
async function askKey(refused) {
  const dialog = $("keydialog");
  $("keyerror").hidden = !refused;
  $("keyerror").textContent = refused ? "The server refused that key: enter another." : "";
  $("key").value = ""; dialog.returnValue = "";  // Escape keeps the last returnValue otherwise
  dialog.showModal();
  await new Promise((resolve) => dialog.addEventListener("close", resolve, { once: true }));
  if (dialog.returnValue !== "ok" || !$("key").value) return false;
  sessionStorage.setItem(KEY, $("key").value);
  return true;
}

// A 401 asks for the key (again, after a wrong one) until one is taken or the user cancels.
async function api(path, options = {}) {
  for (;;) {
    const answer = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
    if (answer.status !== 401) return answer;
    $("keybutton").hidden = false;  // keys are on: the key can be changed at any time
    if (!(await askKey(Boolean(sessionStorage.getItem(KEY))))) return answer;
  }
}

async function errorText(answer) {
  try { const e = await answer.json(); return `${e.error_code}: ${e.error_message}`; }
  catch (_) { return `HTTP ${answer.status}`; }
}

// -- picking a workflow --------------------------------------------------------------------------
async function loadWorkflows() {
  const answer = await api("/api/workflows");
  const picker = $("workflow");
  while (picker.options.length > 1) picker.remove(1);
  if (!answer.ok) {
    const hint = answer.status === 401 ? " Press \"API key…\" to enter one." : "";
    $("source").textContent = (await errorText(answer)) + hint;
    return;
  }
  $("source").textContent = "";
  for (const w of (await answer.json()).workflows) {
    const title = w.title && w.title !== w.workflow_id ? ` — ${w.title}` : "";
    picker.add(new Option(`${w.workflow_id}${title} (${w.parameters} parameters)`, w.workflow_id));
  }
}

// The last pick wins: each pick (a workflow, a version, a pasted one) takes a number, and an answer
// to an earlier pick arriving late (a loaded server answers out of order) is dropped.
const newPick = () => ++state.picks;
const stale = (pick) => pick !== state.picks;

async function pickHosted(id) {
  const pick = newPick();
  if (!id) { $("versionbox").hidden = true; return; }
  await loadVersions(id, pick);
  if (!stale(pick)) await describe(id, pick);
}

// Its versions and aliases in the Version picker: "" runs the bare id (the `default` alias, else
// the newest), `@<alias>` and `@<n>` what they name.
async function loadVersions(id, pick) {
  const picker = $("version");
  picker.replaceChildren(new Option("current (the default alias, else the newest)", ""));
  const answer = await api(`/api/workflows/${refPath(id)}/versions`);
  const listed = answer.ok ? await answer.json() : { versions: [], aliases: {} };
  if (stale(pick)) return;
  for (const [alias, version] of Object.entries(listed.aliases)) picker.add(new Option(`@${alias} → version ${version}`, alias));
  for (const v of [...listed.versions].reverse()) picker.add(new Option(`@${v.version} · ${v.created}`, String(v.version)));
  $("versionbox").hidden = listed.versions.length === 0;
}

async function describe(ref, pick = newPick()) {
  const answer = await api(`/api/workflows/${refPath(ref)}`);
  const described = answer.ok ? await answer.json() : null;
  if (stale(pick)) return;
  if (!described) { $("source").textContent = await errorText(answer); return; }
  state.workflowId = ref; state.workflow = null; state.params = described.parameters;
  const version = described.version ? ` version ${described.version}` : "";
  $("source").innerHTML = `Hosted workflow <b>${escapeHtml(ref)}</b>${version} · <a href="/api/workflows/${refPath(ref)}/openapi.json">its OpenAPI</a>`;
  buildForm(described.parameters);
}

async function useJson(text, label) {
  const pick = newPick();
  let workflow;
  try { workflow = JSON.parse(text); } catch (e) { $("source").textContent = `Not JSON: ${e.message}`; return; }
  let converted = "";
  if (workflow.nodes && workflow.links) {  // the editor's own save: converted by the server
    const answer = await api("/api/workflows/convert", { method: "POST", body: text });
    if (stale(pick)) return;
    if (!answer.ok) { $("source").textContent = await errorText(answer); return; }
    const result = await answer.json();
    if (stale(pick)) return;
    workflow = result.prompt;
    converted = ` (converted from the UI format${result.notes.length ? ": " + result.notes.join("; ") : ""})`;
  }
  const prompt = nodesOf(workflow);
  state.workflowId = null; state.workflow = workflow; state.params = literalParams(prompt);
  $("workflow").value = ""; $("versionbox").hidden = true;
  $("source").textContent = `${label}: ${Object.keys(prompt).length} nodes${converted}`;
  buildForm(state.params);
}

// The nodes of a workflow or of its {"prompt": ..., "extra_data": ...} wrapper: a wrapper's prompt
// holds nodes, while a node whose id is "prompt" has a class_type.
function nodesOf(workflow) {
  const prompt = workflow.prompt;
  return prompt && typeof prompt === "object" && !("class_type" in prompt) ? prompt : workflow;
}

// A dropped workflow has no server-side schema: its literal inputs, typed by their values.
function literalParams(prompt) {
  const params = [];
  for (const [nodeId, node] of Object.entries(prompt)) {
    for (const [input, value] of Object.entries(node.inputs || {})) {
      if (Array.isArray(value) || value === null || typeof value === "object") continue;
      const type = typeof value === "number" ? (Number.isInteger(value) ? "INT" : "FLOAT")
        : typeof value === "boolean" ? "BOOLEAN" : "STRING";
      params.push({ name: `${nodeId}.${input}`, node_id: nodeId, input, class_type: node.class_type,
                    title: node._meta && node._meta.title, type,
                    spec: { default: value, multiline: type === "STRING" && value.length > 40 },
                    loader: false, note: /seed/.test(input) ? "-1 means random" : undefined });
    }
  }
  return params;
}

// -- the form -------------------------------------------------------------------------------------
function buildForm(params) {
  const form = $("form");
  form.replaceChildren();
  for (const p of params) form.append(field(p));
  if (!params.length) form.innerHTML = '<p class="muted">No parameters: run it as it is.</p>';
  $("run").disabled = false;
}

function field(p) {
  const label = document.createElement("label");
  const title = `${p.title || p.class_type} · ${p.input}`;
  label.innerHTML = `<span class="name">${escapeHtml(title)} <span class="hint">${escapeHtml(p.name)}</span></span>`;
  const spec = p.spec || {};
  let input;
  if (p.loader) {
    input = document.createElement("input");
    input.type = "text"; input.value = spec.default ?? ""; input.placeholder = "file name, URL or data URI";
    const file = document.createElement("input");
    file.type = "file";
    file.addEventListener("change", () => readDataUri(file.files[0]).then((uri) => { input.value = uri; }));
    label.append(input, file);
  } else if (spec.options) {
    input = document.createElement("select");
    for (const option of spec.options) input.add(new Option(option, option, false, option === spec.default));
    label.append(input);
  } else if (p.type === "INT" || p.type === "FLOAT") {
    input = document.createElement("input");
    input.type = "number"; input.value = spec.default;
    if (spec.min !== undefined) input.min = spec.min;
    if (spec.max !== undefined) input.max = spec.max;
    input.step = spec.step ?? (p.type === "INT" ? 1 : "any");
    label.append(input);
    if (p.note) {  // a seed: the random toggle sends -1, the server reports the seed it chose
      const random = document.createElement("input");
      random.type = "checkbox"; random.className = "random"; random.checked = spec.default === -1;
      const text = document.createElement("span"); text.className = "hint"; text.textContent = " random";
      random.addEventListener("change", () => { input.disabled = random.checked; });
      input.disabled = random.checked;
      label.append(random, text);
    }
  } else if (p.type === "BOOLEAN") {
    input = document.createElement("input");
    input.type = "checkbox"; input.checked = Boolean(spec.default);
    label.append(input);
  } else {
    input = document.createElement(spec.multiline ? "textarea" : "input");
    if (!spec.multiline) input.type = "text";
    input.value = spec.default ?? "";
    if (spec.multiline) input.rows = 3;
    label.append(input);
  }
  input.name = p.name; input.dataset.type = p.type;
  return label;
}

function readDataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result); reader.onerror = reject;
    reader.readAsDataURL(file);
  });
}

function overrides() {
  const values = {};
  for (const label of $("form").querySelectorAll("label")) {
    const input = label.querySelector("[name]");
    const random = label.querySelector(".random");
    const type = input.dataset.type;
    let value = input.type === "checkbox" ? input.checked : input.value;
    if (random && random.checked) value = -1;
    else if (type === "INT") value = parseInt(value, 10);
    else if (type === "FLOAT") value = parseFloat(value);
    values[input.name] = value;
  }
  return values;
}

function runRequest() {
  const query = "stream=true&output_base64=true&previews=true";
  const values = overrides();
  if (state.workflowId) {
    return [`/api/workflows/${refPath(state.workflowId)}/run?${query}`, values];
  }
  const body = JSON.parse(JSON.stringify(state.workflow));
  const prompt = nodesOf(body);
  for (const [key, value] of Object.entries(values)) {
    const dot = key.lastIndexOf(".");
    prompt[key.slice(0, dot)].inputs[key.slice(dot + 1)] = value;
  }
  return [`/api/serverless/run?${query}`, body];
}

// -- running --------------------------------------------------------------------------------------
async function run() {
  const [path, body] = runRequest();
  showCall(path, body);
  const controller = new AbortController();
  state.run = { controller, taskId: null, cancelled: false };
  state.shown = new Set();
  setProgress(0); setState("submitting…", "");
  $("outputs").replaceChildren(); $("seeds").textContent = ""; $("log").textContent = ""; $("count").textContent = "0";
  $("preview").hidden = true; $("preview-img").removeAttribute("src");
  $("run").disabled = true; $("cancel").disabled = false;
  try {
    const answer = await api(path, { method: "POST", body: JSON.stringify(body), signal: controller.signal,
                                     headers: { "Content-Type": "application/json" } });
    if (!answer.ok) { setState(await errorText(answer), "failed"); return; }
    await readEvents(answer.body.getReader(), onPayload);
  } catch (e) {
    if (state.run.cancelled) setState("cancelled", "cancelled");
    else setState(`connection lost: ${e.message}`, "failed");
  } finally {
    $("run").disabled = false; $("cancel").disabled = true;
  }
}

// Server-sent events by hand: `id:` and `data:` lines, a blank line ends an event.
async function readEvents(reader, handle) {
  const decoder = new TextDecoder();
  let buffer = "", data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") { if (data.length) handle(JSON.parse(data.join("\n"))); data = []; }
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      // `id:` lines number the events (for resuming); `: ping` comments keep the connection alive
    }
  }
}

function onPayload(payload) {
  if (payload.type === "serverless_progress") return onProgress(payload.data);
  if (payload.type === "serverless_output") return showOutput(payload.data);
  if (payload.type === "serverless_preview") return showPreview(payload.data);
  if (payload.type === "serverless_api") {
    $("preview").hidden = true;  // the image itself is here
    for (const item of payload.data.results) showOutput(item);
    showSeeds(payload.data.seeds || {});
    setProgress(100);
    return setState(`succeeded in ${payload.data.execution_time}s`, "succeeded");
  }
  if (payload.type === "error") {
    const cancelled = payload.error_code === "EXECUTION_INTERRUPTED";
    return setState(cancelled ? `cancelled (${payload.error_message})` : `${payload.error_code}: ${payload.error_message}`,
                    cancelled ? "cancelled" : "failed");
  }
  const log = $("log");  // ComfyUI's own message
  log.textContent += JSON.stringify(payload) + "\n";
  $("count").textContent = String(Number($("count").textContent) + 1);
}

function onProgress(data) {
  if (state.run) state.run.taskId = data.task_id;
  setProgress(data.percent);
  const node = data.node ? ` · ${data.node.title || data.node.class_type} (#${data.node.id})` : "";
  const queue = data.state === "queued" && data.queue_position ? ` · position ${data.queue_position} of ${data.queue_size}` : "";
  const eta = data.eta_s != null ? ` · ETA ${Math.round(data.eta_s)}s` : "";
  if (!(state.run && state.run.cancelled)) setState(`${data.state}${queue}${node}${eta}`, data.state);
}

async function cancel() {
  const current = state.run;
  if (!current) return;
  current.cancelled = true;
  setState("cancelling…", "cancelling");
  if (current.taskId) {  // from any instance, where job control is served; harmless where it is not
    try { await api(`/api/serverless/cancel?task_id=${encodeURIComponent(current.taskId)}`, { method: "POST" }); }
    catch (_) { /* the hang-up below cancels it anyway */ }
  }
  current.controller.abort();  // closing the stream cancels the job (CANCEL_ON_DISCONNECT)
}

// -- showing --------------------------------------------------------------------------------------
function setProgress(percent) {
  $("fill").style.width = `${percent}%`;
  $("percent").textContent = `${Math.round(percent)}%`;
  $("bar").setAttribute("aria-valuenow", String(Math.round(percent)));
}

function setState(text, kind) { $("state").textContent = text; $("state").className = kind || "muted"; }

function showOutput(item) {
  const out = item.output, raw = out.raw || {};
  const key = `${item.node_id}/${raw.filename}/${item.batch_id}`;
  const content = out.base64 && out.base64.content;
  if (state.shown.has(key) || !content) return;  // an early event without bytes: the result brings them
  state.shown.add(key);
  const mime = out.mime || "application/octet-stream", uri = `data:${mime};base64,${content}`;
  const figure = document.createElement("figure");
  let media;
  if (mime.startsWith("image/")) { media = document.createElement("img"); media.alt = raw.filename; }
  else if (mime.startsWith("audio/")) { media = document.createElement("audio"); media.controls = true; }
  else if (mime.startsWith("video/")) { media = document.createElement("video"); media.controls = true; }
  if (media) { media.src = uri; figure.append(media); }
  const caption = document.createElement("figcaption");
  const link = document.createElement("a");
  link.href = uri; link.download = raw.filename; link.textContent = `${raw.filename} (node ${item.node_id})`;
  caption.append(link);
  figure.append(caption);
  $("outputs").append(figure);
}

// The sampler's picture of the image forming (at most 4 a second), until the result.
function showPreview(data) {
  if (state.run && state.run.cancelled) return;
  $("preview-img").src = `data:${data.mime};base64,${data.base64}`;
  const where = data.step != null ? ` · step ${data.step}` : "";
  $("preview-caption").textContent = `forming… (node ${data.node}${where})`;
  $("preview").hidden = false;
}

function showSeeds(seeds) {
  const parts = [];
  for (const [node, inputs] of Object.entries(seeds)) {
    for (const [input, value] of Object.entries(inputs)) parts.push(`${node}.${input} = ${value}`);
  }
  $("seeds").textContent = parts.length ? `Seeds used: ${parts.join(", ")}` : "";
}

// -- the call, as code -----------------------------------------------------------------------------
// The run's request as curl and as the Python client's call (the key, when one is used, comes from
// the environment: it is never written into the page).
function showCall(path, body) {
  const keyed = Boolean(sessionStorage.getItem(KEY));
  const json = JSON.stringify(body);
  const auth = keyed ? ` \\\n  -H "Authorization: Bearer $COMFY_SERVERLESS_API_KEY"` : "";
  $("curl").textContent = `curl -N -X POST '${location.origin}${path}' \\\n  -H 'Content-Type: application/json'${auth} \\\n  -d ${shellQuote(json)}`;
  const options = "output_base64=True, previews=True";
  const what = state.workflowId
    ? `workflow_id=${py(state.workflowId)}, overrides=${py(body)}`
    : `json.loads(${py(json)})`;
  const lines = [
    ...(state.workflowId ? [] : ["import json", ""]),
    "from serverless.client import Client",
    "",
    `with Client(${py(location.origin)}) as client:${keyed ? "  # the key: COMFY_SERVERLESS_API_KEY" : ""}`,
    `    for event in client.stream(${what}, ${options}):`,
    "        print(event.type)",
  ];
  $("python").textContent = lines.join("\n");
  $("call").hidden = false;
}

function shellQuote(text) { return `'${text.replace(/'/g, "'\\''")}'`; }

// A JSON value as a Python literal.
function py(value) {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map(py).join(", ")}]`;
  if (typeof value === "object") return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${py(v)}`).join(", ")}}`;
  return JSON.stringify(value);
}

function escapeHtml(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// -- wiring ---------------------------------------------------------------------------------------
$("workflow").addEventListener("change", (e) => pickHosted(e.target.value));
$("version").addEventListener("change", (e) => describe($("workflow").value + (e.target.value ? `@${e.target.value}` : "")));
$("use-paste").addEventListener("click", () => useJson($("paste").value, "Pasted workflow"));
$("run").addEventListener("click", run);
$("cancel").addEventListener("click", cancel);
$("keybutton").addEventListener("click", async () => { if (await askKey(false)) await loadWorkflows(); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", async (e) => {
  e.preventDefault(); drop.classList.remove("over");
  const file = e.dataTransfer.files[0];
  if (file) useJson(await file.text(), file.name);
});
loadWorkflows();
