// gpugate's built-in pages. Everything comes from the API with the user's key (a bearer header);
// forms and the API explorer are built from /openapi.json, so they follow the API as it grows.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const KEY = "gpugate.key";
let spec = null;
let streaming = null; // the AbortController of the open page's event stream

const key = () => localStorage.getItem(KEY);
const auth = () => ({ Authorization: `Bearer ${key()}` });

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children);
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...auth(), ...(options.headers || {}) } });
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const error = new Error(body?.responseStatus?.message || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

// Server-sent events over fetch (EventSource cannot send the key as a header).
async function events(path, onEvent, signal) {
  const response = await fetch(path, { headers: auth(), signal });
  if (!response.ok) throw new Error((await response.json()).responseStatus?.message || response.statusText);
  return readEvents(response, onEvent);
}

// Each event of a server-sent event stream: onEvent(name, data); data "[DONE]" (OpenAI's last) is passed as is.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(name, data === "[DONE]" ? data : JSON.parse(data));
    }
  }
}

function openStream(path, onEvent) {
  streaming?.abort();
  streaming = new AbortController();
  const controller = streaming;
  events(path, onEvent, controller.signal).catch((error) => {
    if (!controller.signal.aborted) console.warn("stream ended", error);
  });
}

// ---- pages -------------------------------------------------------------------------------------

const pages = { dashboard: showDashboard, playground: showPlayground, chat: showChat, keys: showKeys, api: showExplorer };

async function route() {
  const page = (location.hash || "#dashboard").slice(1);
  streaming?.abort();
  for (const section of document.querySelectorAll("section")) section.hidden = true;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.page === page);
  if (!key()) {
    $("#login").hidden = false;
    return;
  }
  $("#logout").hidden = false;
  $(`#${page}`).hidden = false;
  try {
    await (pages[page] || showDashboard)();
  } catch (error) {
    if (error.status === 401) return forgetKey("That key is not valid.");
    $(`#${page}`).append(el("p", { class: "error", text: error.message }));
  }
}

function forgetKey(message = "") {
  localStorage.removeItem(KEY);
  $("#login-error").textContent = message;
  $("#logout").hidden = true;
  route();
}

async function loadSpec() {
  spec = spec || await (await fetch("/openapi.json")).json();
  return spec;
}

// ---- dashboard -----------------------------------------------------------------------------------

async function showDashboard() {
  renderDashboard(await api("/api/GetDashboard"));
  $("#dashboard-live").textContent = "live";
  openStream("/api/GetDashboardEvents", (name, data) => renderDashboard(data));
}

const gb = (bytes) => `${(bytes / 2 ** 30).toFixed(1)} GB`;
const seconds = (job) => job.finished ? `${((new Date(job.finished) - new Date(job.queued)) / 1000).toFixed(2)} s` : "";

function renderDashboard(data) {
  $("#problems").replaceChildren(...(data.problems || []).map((problem) => el("p", { class: "problem", text: problem })));
  const waiting = Object.entries(data.queue);
  $("#queue").replaceChildren(el("p", { text: `${waiting.reduce((n, [, c]) => n + c, 0)} waiting, ${data.running} running` }),
    ...waiting.map(([name, count]) => el("div", { text: `${name}: ${count}` })));
  const top = Math.max(1, ...data.throughput);
  const width = 600 / data.throughput.length;
  $("#throughput").replaceChildren(...data.throughput.map((count, i) => {
    const bar = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const height = 78 * count / top;
    for (const [name, value] of Object.entries({ x: i * width, y: 80 - height, width: width - 1, height, fill: "#2f6fed" })) bar.setAttribute(name, value);
    return bar;
  }));
  $("#agents").replaceChildren(...(data.agents.length ? data.agents.map(agentCard) : [el("p", { class: "muted", text: "No agent is connected." })]));
  $("#recent tbody").replaceChildren(...data.recent.map((job) => el("tr", { "data-job": job.jobId },
    el("td", { text: job.jobId }), el("td", { text: job.api }), el("td", { class: `state-${job.jobState}`, text: job.jobState }),
    el("td", { text: job.agent || "" }), el("td", { text: seconds(job) }), el("td", { text: job.error?.message || "" }))));
}

function agentCard(agent) {
  const devices = agent.devices.map((d) => {
    const used = d.vramTotal ? 100 * (d.vramTotal - d.vramFree) / d.vramTotal : 0;
    return el("div", {}, el("div", { text: `${agent.cpuOnly ? "CPU" : `GPU ${d.index}`}: ${d.name} — ${gb(d.vramFree)} free of ${gb(d.vramTotal)}` }),
      el("div", { class: "bar", title: `${used.toFixed(0)}% used` }, el("div", { style: `width: ${used}%` })));
  });
  const state = agent.paused ? el("div", { class: "problem", text: `paused: ${agent.paused}` })
    : agent.draining ? el("div", { class: "muted", text: "shutting down: finishing its jobs" }) : "";
  return el("div", { class: `card agent${agent.paused ? " unhealthy" : ""}`, "data-name": agent.name },
    el("h2", { text: agent.name }), state, ...devices,
    el("div", { class: "muted", text: `loaded: ${agent.loaded.join(", ") || "nothing"}` }),
    el("div", { class: "muted", text: `running: ${agent.running.map((id) => `#${id}`).join(", ") || "idle"}` }),
    el("div", { class: "muted", text: `${agent.models} models · ${agent.capabilities.join(", ")}` }),
    agent.router ? el("div", { class: "muted", text: `connected to router ${agent.router}` }) : "");
}

// ---- chat: OpenAI's /v1/chat/completions, streamed ----------------------------------------------------

let conversation = [];
let chatting = null; // the AbortController of the answer being streamed

async function showChat() {
  const { data } = await api("/v1/models");
  const select = $("#chat-model");
  const chosen = select.value;
  select.replaceChildren(...data.map((m) => el("option", { value: m.id, text: m.id, selected: m.id === chosen })));
  if (!data.length) $("#chat-error").textContent = "No chat model is served now: start an agent with the chat runner.";
  renderChat();
}

function renderChat() {
  $("#chat-log").replaceChildren(...conversation.map((m) => el("div", { class: `message ${m.role}` },
    el("strong", { text: m.role === "user" ? "You" : "Assistant" }), el("p", { text: m.content }))));
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("#chat-input");
  const system = $("#chat-system").value.trim();
  conversation.push({ role: "user", content: input.value });
  input.value = "";
  const answer = { role: "assistant", content: "" };
  conversation.push(answer);
  renderChat();
  const shown = $("#chat-log").lastElementChild.querySelector("p");
  $("#chat-error").textContent = "";
  $("#chat-stop").hidden = false;
  $("#chat-send").disabled = true;
  chatting = new AbortController();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...conversation.slice(0, -1)];
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", signal: chatting.signal, headers: { ...auth(), "Content-Type": "application/json" },
      body: JSON.stringify({ model: $("#chat-model").value, messages, stream: true }),
    });
    if (!response.ok) throw new Error((await response.json()).error?.message || response.statusText);
    await readEvents(response, (name, data) => {
      if (data === "[DONE]") return;
      if (data.error) throw new Error(data.error.message);
      answer.content += data.choices[0]?.delta?.content || "";
      shown.textContent = answer.content;
    });
  } catch (error) {
    if (!chatting.signal.aborted) $("#chat-error").textContent = error.message;
  } finally {
    $("#chat-stop").hidden = true;
    $("#chat-send").disabled = false;
    chatting = null;
  }
}

// ---- playground ----------------------------------------------------------------------------------

function resolve(schema) {
  if (schema?.$ref) return resolve(spec.components.schemas[schema.$ref.split("/").pop()]);
  if (schema?.anyOf) return resolve(schema.anyOf.find((s) => s.type !== "null") || schema.anyOf[0]);
  return schema || {};
}

async function showPlayground() {
  spec = null; // workflows come and go with the agents: read the document afresh
  await loadSpec();
  imageModels = (await api("/api/QueryMediaModels?take=1000")).results.filter((m) => m.available);
  const select = $("#playground-api");
  if (!select.options.length) {
    const apis = Object.keys(spec.paths).filter((p) => p.startsWith("/api/Queue")).map((p) => p.slice("/api/Queue".length));
    select.replaceChildren(...apis.map((name) => el("option", { value: name, text: name })));
    select.addEventListener("change", renderForm);
  }
  const wanted = sessionStorage.getItem("gpugate.try");
  sessionStorage.removeItem("gpugate.try");
  if (wanted) select.value = wanted;
  renderForm();
}

const HIDDEN_FIELDS = new Set(["refId", "tag", "replyTo", "arguments", "args"]);
const IMAGE_APIS = new Set(["TextToImage", "ImageToImage", "ImageWithMask"]);
let imageModels = [];

// an image model as the playground lists it: what can run now, with its family's defaults
function modelOption(m) {
  const d = [m.familyTitle || m.family, m.width && `${m.width}x${m.height}`, m.steps && `${m.steps} steps`, m.cfgScale != null && `cfg ${m.cfgScale}`];
  return el("option", { value: m.id, text: `${m.id} (${d.filter(Boolean).join(", ")})` });
}

function renderForm() {
  const name = $("#playground-api").value;
  let schema = resolve({ $ref: `#/components/schemas/${name}` });
  let extra = [];
  if (name === "ComfyWorkflow") { // the chosen workflow's own parameters, as fields of the form
    const workflows = schema.properties.workflow?.enum || [];
    const chosen = $("#playground-workflow")?.value || workflows[0];
    const pick = el("select", { name: "workflow", id: "playground-workflow" }, ...workflows.map((w) => el("option", { value: w, text: w, selected: w === chosen })));
    pick.addEventListener("change", renderForm);
    extra = [el("label", {}, el("span", { text: "workflow *" }), pick)];
    schema = chosen ? resolve({ $ref: `#/components/schemas/workflow.${chosen}` }) : {};
  }
  const required = new Set(schema.required || []);
  const fields = Object.entries(schema.properties || {}).filter(([field]) => !HIDDEN_FIELDS.has(field) && !(extra.length && field === "workflow")).map(([field, raw]) => {
    const s = resolve(raw);
    let input;
    if (field === "model" && IMAGE_APIS.has(name)) input = el("select", { name: field }, el("option", { value: "", text: "(the default model)" }), ...imageModels.map(modelOption));
    else if (s.format === "binary") input = el("input", { type: "file", name: field, accept: s.contentMediaType });
    else if (s.enum) input = el("select", { name: field }, ...(required.has(field) ? [] : [el("option", { value: "", text: "" })]),
      ...s.enum.map((v) => el("option", { value: v, text: v, selected: v === raw.default })));
    else if (s.type === "integer" || s.type === "number") input = el("input", { type: "number", name: field, min: s.minimum, max: s.maximum, step: s.type === "integer" ? (s.multipleOf || 1) : "any", value: raw.default ?? "" });
    else if (s.type === "boolean") input = el("input", { type: "checkbox", name: field });
    else if (/prompt|input|text/i.test(field)) input = el("textarea", { name: field });
    else input = el("input", { name: field, value: raw.default ?? "" });
    input.required = required.has(field);
    return el("label", {}, el("span", { text: `${field}${required.has(field) ? " *" : ""}` }), input);
  });
  $("#playground-form").replaceChildren(...extra, ...fields, el("button", { type: "submit", text: `Run ${name}` }));
}

async function runPlayground(event) {
  event.preventDefault();
  const name = $("#playground-api").value;
  const form = new FormData();
  for (const [field, value] of new FormData($("#playground-form"))) {
    if (value instanceof File ? value.size : value !== "") form.append(field, value);
  }
  const result = $("#playground-result");
  const progress = $("#playground-progress");
  result.replaceChildren();
  try {
    const queued = await api(`/api/Queue${name}`, { method: "POST", body: form });
    progress.hidden = false;
    $("span", progress).textContent = queued.status;
    openStream(`/api/GetJobEvents?jobId=${queued.jobId}`, (kind, status) => {
      $("span", progress).textContent = status.status;
      if (status.progress?.total) $("progress", progress).value = status.progress.step / status.progress.total;
      if (kind === "result") showResult(status);
    });
  } catch (error) {
    result.append(el("p", { class: "error", text: error.message }));
  }
}

const KINDS = { image: ["png", "jpg", "jpeg", "webp", "gif", "bmp", "tiff"], audio: ["wav", "mp3", "ogg", "flac", "aac", "m4a"],
                video: ["mp4", "webm", "mov", "mkv", "avi", "wmv", "mpeg"] };
const mediaKind = (name) => Object.keys(KINDS).find((k) => KINDS[k].includes(name.split(".").pop().toLowerCase()));

async function showResult(status) {
  const result = $("#playground-result");
  $("#playground-progress").hidden = true;
  result.dataset.jobId = status.jobId;
  result.dataset.state = status.jobState;
  if (status.responseStatus) result.append(el("p", { class: "error", text: `${status.jobState}: ${status.responseStatus.message}` }));
  for (const item of status.results) {
    if (item.text !== null && item.text !== undefined) {
      result.append(el("pre", { text: item.text }));
      continue;
    }
    // result URLs are signed: the browser loads them as they are, no header needed
    const kind = mediaKind(item.fileName);
    if (kind === "image") result.append(el("img", { src: item.url, alt: item.fileName }));
    else if (kind === "audio") result.append(el("audio", { src: item.url, controls: true }));
    else if (kind === "video") result.append(el("video", { src: item.url, controls: true }));
    result.append(el("a", { href: `${item.url}&download=true`, text: item.fileName }));
  }
}

// ---- keys ------------------------------------------------------------------------------------------

async function showKeys() {
  $("#keys-error").textContent = "";
  let listing;
  try {
    listing = await api("/api/ListApiKeys");
  } catch (error) {
    if (error.status === 403) return void ($("#keys-error").textContent = "Managing keys needs an admin key.");
    throw error;
  }
  $("#key-list tbody").replaceChildren(...listing.keys.map((k) => el("tr", { "data-key": k.id },
    el("td", { text: k.id }), el("td", { text: k.name }), el("td", { text: `${k.prefix}…` }),
    el("td", { text: k.apis ? k.apis.join(", ") : "all" }),
    el("td", { text: k.revoked ? "revoked" : (k.admin ? "admin" : "client") }),
    el("td", { text: new Date(k.created).toLocaleString() }),
    el("td", {}, k.revoked ? "" : el("button", { text: "Revoke", onclick: () => revokeKey(k.id) })))));
}

async function createKey(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  try {
    const made = await api("/api/CreateApiKey", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name: form.get("name"), apis: form.get("apis") || null, admin: form.get("admin") === "on" }) });
    const shown = $("#key-new");
    shown.hidden = false;
    shown.textContent = `key ${made.key.id}: ${made.token}\nwebhook secret: ${made.webhookSecret}\n(shown once: copy them now)`;
    event.target.reset();
    await showKeys();
  } catch (error) {
    $("#keys-error").textContent = error.message;
  }
}

async function revokeKey(id) {
  await api("/api/RevokeApiKey", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ id }) });
  await showKeys();
}

// ---- API explorer ------------------------------------------------------------------------------------

async function showExplorer() {
  await loadSpec();
  const list = $("#operations");
  if (list.children.length) return;
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, operation] of Object.entries(methods)) {
      list.append(el("li", { "data-operation": operation.operationId, onclick: (e) => showOperation(e.currentTarget, path, method, operation) },
        el("span", { class: "method", text: method.toUpperCase() }), path));
    }
  }
}

function schemaTable(schema) {
  const s = resolve(schema);
  const required = new Set(s.required || []);
  return el("table", {}, el("thead", {}, el("tr", {}, el("th", { text: "field" }), el("th", { text: "type" }), el("th", { text: "rules" }))),
    el("tbody", {}, ...Object.entries(s.properties || {}).map(([name, raw]) => {
      const p = resolve(raw);
      const rules = ["minimum", "maximum", "multipleOf", "minLength", "maxLength", "pattern", "default"]
        .filter((r) => (p[r] ?? raw[r]) !== undefined).map((r) => `${r} ${JSON.stringify(p[r] ?? raw[r])}`);
      if (p.enum) rules.push(`one of ${p.enum.join(", ")}`);
      return el("tr", {}, el("td", { text: `${name}${required.has(name) ? " *" : ""}` }),
        el("td", { text: p.format === "binary" ? "file" : (p.type || (raw.$ref ? raw.$ref.split("/").pop() : "any")) }),
        el("td", { text: rules.join("; ") }));
    })));
}

function showOperation(item, path, method, operation) {
  for (const li of document.querySelectorAll("#operations li")) li.classList.toggle("active", li === item);
  const body = operation.requestBody?.content;
  const parts = [el("h2", { text: `${method.toUpperCase()} ${path}` }), el("p", { text: operation.summary })];
  if (operation.parameters) parts.push(el("h2", { text: "Query" }), schemaTable({ properties: Object.fromEntries(operation.parameters.map((p) => [p.name, p.schema])) }));
  if (body) {
    const [type, { schema }] = Object.entries(body)[0];
    parts.push(el("h2", { text: `Body (${Object.keys(body).join(" or ")})` }), schemaTable(schema));
  }
  const ok = operation.responses["200"]?.content;
  const answer = ok && Object.values(ok)[0].schema;
  if (answer) parts.push(el("h2", { text: "Answer" }), el("pre", { text: JSON.stringify(answer.$ref ? resolve(answer) : answer, null, 2) }));
  if (path.startsWith("/api/Queue")) parts.push(el("a", { href: "#playground", text: "Try it in the playground", onclick: () => { sessionStorage.setItem("gpugate.try", path.slice(10)); } }));
  $("#operation").replaceChildren(...parts);
}

// ---- start -------------------------------------------------------------------------------------------

$("#login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY, $("#login-key").value.trim());
  $("#login-error").textContent = "";
  route();
});
$("#logout").addEventListener("click", () => forgetKey());
$("#playground-form").addEventListener("submit", runPlayground);
$("#chat-form").addEventListener("submit", sendChat);
$("#chat-stop").addEventListener("click", () => chatting?.abort());  // leaving the stream cancels the chat
$("#chat-clear").addEventListener("click", () => { chatting?.abort(); conversation = []; renderChat(); });
$("#key-form").addEventListener("submit", createKey);
window.addEventListener("hashchange", route);
route();
