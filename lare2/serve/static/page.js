// The page of `lare2 serve`: pick or drop images, see each one's p(fake), verdict and heatmap.
// Every text from a file or the server goes in with textContent (never innerHTML): names are shown, not run.
"use strict";

const FILES_PER_REQUEST = 8;   // several images per request: the server batches them with other requests
const REQUESTS_AT_ONCE = 2;
const entries = [];            // {file, url, card, row, heatmap}
const waiting = [];            // entries not yet sent
let info = null;
let sending = 0;

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function loadInfo() {
  try {
    const response = await fetch("/v1/info");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    info = await response.json();
    const prompts = info.prompt_mode === "class" ? "class prompts" : `${info.prompt_mode} prompts`;
    const kind = info.model.kind ?? "detector";
    const threshold = info.threshold.toFixed(3);
    $("run-info").textContent = `Run ${info.run}: fake when p(fake) > ${threshold} (${prompts}, ${kind}).`;
    $("class-field").hidden = info.prompt_mode !== "class";
  } catch (err) {
    $("run-info").textContent = `Cannot read the run's settings (${err.message}); scoring may still work.`;
  }
}

function addFiles(fileList) {
  for (const file of fileList) {
    const entry = { file, url: URL.createObjectURL(file), row: null, heatmap: null };
    entry.card = makeCard(entry);
    entries.push(entry);
    waiting.push(entry);
  }
  showSummary();
  pump();
}

function makeCard(entry) {
  const item = element("li");
  const button = element("button", "result");
  button.type = "button";
  button.dataset.verdict = "pending";
  const thumb = element("img", "thumb");
  thumb.alt = "";
  thumb.src = entry.url;
  thumb.addEventListener("error", () => { thumb.style.visibility = "hidden"; });
  const bar = element("span", "bar");
  bar.setAttribute("aria-hidden", "true");
  bar.append(element("span", "fill"), element("span", "mark"));
  const line = element("span", "line");
  line.append(element("span", "verdict", "scoring\u2026"), element("span", "p"));
  button.append(thumb, element("span", "name", entry.file.name), bar, line);
  button.addEventListener("click", () => openHeatmap(entry));
  item.append(button);
  $("results").append(item);
  return button;
}

function showRow(entry, row) {
  entry.row = row;
  const card = entry.card;
  card.dataset.status = row.status;
  if (row.status !== "ok") {
    card.dataset.verdict = "error";
    card.querySelector(".verdict").textContent = "error";
    card.append(element("p", "why", row.error || "not scored"));
    card.setAttribute("aria-label", `${entry.file.name}: error: ${row.error}`);
    return;
  }
  const verdict = row.is_fake ? "fake" : "real";
  card.dataset.verdict = verdict;
  card.dataset.pFake = String(row.p_fake);
  card.querySelector(".fill").style.width = `${(100 * row.p_fake).toFixed(2)}%`;
  card.querySelector(".mark").style.left = `${(100 * row.threshold).toFixed(2)}%`;
  card.querySelector(".verdict").textContent = verdict.toUpperCase();
  card.querySelector(".p").textContent = `p(fake) ${row.p_fake.toFixed(3)}`;
  card.setAttribute("aria-label",
    `${entry.file.name}: ${verdict}, p(fake) ${row.p_fake.toFixed(3)}; press for its heatmap`);
}

function showSummary() {
  const done = entries.filter((e) => e.row);
  const fake = done.filter((e) => e.row.status === "ok" && e.row.is_fake).length;
  const real = done.filter((e) => e.row.status === "ok" && !e.row.is_fake).length;
  const errors = done.length - fake - real;
  const pending = entries.length - done.length;
  $("summary").textContent = entries.length === 0 ? "No images yet." :
    `${fake} fake \u00b7 ${real} real \u00b7 ${errors} error${errors === 1 ? "" : "s"}` +
    (pending ? ` \u00b7 scoring ${pending}\u2026` : "");
  $("summary").dataset.pending = String(pending);
}

function pump() {
  while (sending < REQUESTS_AT_ONCE && waiting.length) {
    sending += 1;
    send(waiting.splice(0, FILES_PER_REQUEST)).finally(() => { sending -= 1; pump(); });
  }
}

function form(files, withClass) {
  const body = new FormData();
  for (const entry of files) body.append("files", entry.file, entry.file.name);
  const className = $("class-name").value.trim();
  if (withClass && className) body.append("class_name", className);
  return body;
}

async function post(files, query) {
  // 503: the queue is full; wait as told and try again
  for (;;) {
    const response = await fetch(`/v1/score${query}`, { method: "POST", body: form(files, true) });
    if (response.status !== 503) return response;
    const seconds = Number(response.headers.get("Retry-After")) || 1;
    await new Promise((done) => setTimeout(done, 1000 * seconds));
  }
}

async function send(files) {
  let response;
  try {
    response = await post(files, "");
  } catch (err) {
    return failAll(files, `the server did not answer (${err.message})`);
  }
  if (response.status === 413 && files.length > 1) {  // too big together: one at a time
    const half = Math.ceil(files.length / 2);
    await send(files.slice(0, half));
    return send(files.slice(half));
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail ?? detail; } catch (err) { /* not JSON */ }
    return failAll(files, `HTTP ${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  const answer = await response.json();
  answer.results.forEach((row, i) => showRow(files[i], row));
  showSummary();
}

function failAll(files, why) {
  for (const entry of files) showRow(entry, { status: "error", error: why });
  showSummary();
}

async function openHeatmap(entry) {
  if (!entry.row || entry.row.status !== "ok") return;
  const dialog = $("heatmap"), image = $("heatmap-image"), status = $("heatmap-status");
  $("heatmap-title").textContent =
    `${entry.file.name}: ${entry.row.is_fake ? "FAKE" : "real"}, p(fake) ${entry.row.p_fake.toFixed(3)}`;
  image.hidden = !entry.heatmap;
  if (entry.heatmap) image.src = entry.heatmap;
  status.textContent = entry.heatmap ? "" : "Drawing the heatmap\u2026";
  dialog.showModal();
  if (entry.heatmap) return;
  try {
    const response = await post([entry], "?heatmaps=true");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const row = (await response.json()).results[0];
    if (!row.heatmap) throw new Error(row.error || "no heatmap");
    entry.heatmap = `data:image/png;base64,${row.heatmap}`;
    image.src = entry.heatmap;
    image.alt = `Heatmap of ${entry.file.name}: the image, its LaRE map and EGRE's attention`;
    image.hidden = false;
    status.textContent = "";
  } catch (err) {
    status.textContent = `No heatmap: ${err.message}`;
  }
}

function clearAll() {
  waiting.length = 0;
  for (const entry of entries) URL.revokeObjectURL(entry.url);
  entries.length = 0;
  $("results").replaceChildren();
  showSummary();
}

function wire() {
  const drop = $("drop");
  $("pick").addEventListener("change", (event) => { addFiles(event.target.files); event.target.value = ""; });
  $("clear").addEventListener("click", clearAll);
  $("heatmap-close").addEventListener("click", () => $("heatmap").close());
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => { event.preventDefault(); addFiles(event.dataTransfer.files); });
  loadInfo();
}

wire();
