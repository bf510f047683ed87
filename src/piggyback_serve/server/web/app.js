// The try-it page: no build step, no dependencies. Talks to the native JSON API.
"use strict";

const $ = (id) => document.getElementById(id);
const TOP_K = 5;
let tasks = {};
let chosen = null; // the File (or Blob) to classify

function setState(state) { document.body.dataset.state = state; }

const FORMATS = "JPEG, PNG, WebP, GIF, BMP or TIFF";
const LABELS_SHOWN = 20;
// What the page says for each answer it can meet, in a user's words. The server's own
// message (meant for developers) stays under "Details".
const PLAIN_BY_STATUS = {
  400: "The server could not use this file. Pick another image file.",
  401: "This server asks for a token to classify images, which this page cannot send.",
  403: "This server asks for a token to classify images, which this page cannot send.",
  404: "This task is not served any more. Reload the page to see the tasks there are.",
  413: "This image is too large. Pick a smaller one (fewer pixels or a smaller file).",
  415: `This file is not an image (${FORMATS}). Pick an image file.`,
  500: "Something went wrong on the server while classifying this image. Try again.",
  503: "The server is busy right now. Try again in a moment.",
  504: "The server took too long to answer. Try again in a moment, or with a smaller image.",
};
const PLAIN_BY_CODE = {
  not_ready: "The server is still starting. Try again in a moment.",
  registry_unavailable: "The server cannot reach its tasks right now. Try again in a moment.",
};
const NETWORK_ERROR =
  "Could not reach the server. Check your connection, or that the server is running, and try again.";

function showError(plain, detail) {
  $("error-text").textContent = plain;
  $("error-detail").textContent = detail || "";
  $("error-details").hidden = !detail;
  $("error").hidden = false;
  setState("error");
}

// A failed answer as {plain, detail}: the sentence for the user, and the server's own
// message ({"error": {"code", "message"}}) for whoever wants the details.
async function errorOf(response) {
  let code = "", detail = `HTTP ${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      const e = body.error;
      code = e.code || "";
      detail = typeof e === "string" ? e : `${e.message} (${e.code}, HTTP ${response.status})`;
    }
  } catch (_) { /* not JSON */ }
  const plain = PLAIN_BY_CODE[code] || PLAIN_BY_STATUS[response.status] ||
    `Something went wrong (HTTP ${response.status}). Try again.`;
  return { plain, detail };
}

async function loadTasks() {
  const select = $("task");
  try {
    const response = await fetch("/tasks");
    if (!response.ok) throw await errorOf(response);
    const list = (await response.json()).tasks;
    tasks = Object.fromEntries(list.map((t) => [t.name, t]));
    select.replaceChildren(...list.map((t) => new Option(`${t.name} (${t.labels.length} labels)`, t.name)));
    if (!list.length) select.replaceChildren(new Option("no tasks registered", ""));
    const wanted = new URLSearchParams(location.search).get("task");
    if (wanted && tasks[wanted]) select.value = wanted;
    select.disabled = !list.length;
    describeTask();
    setState("ready");
  } catch (err) {
    // errorOf's {plain, detail}, or fetch's own failure (no answer came back).
    const { plain, detail } = err.plain ? err : { plain: NETWORK_ERROR, detail: err.message };
    select.replaceChildren(new Option("tasks unavailable", ""));
    showError(`Could not load the tasks. ${plain}`, detail);
  }
  updateButton();
}

// What the chosen task expects: its description, input size and labels, and that it
// always answers with one of them.
function describeTask() {
  const t = tasks[$("task").value];
  $("task-info").hidden = !t;
  if (!t) return;
  $("task-description").textContent = t.description || "";
  $("task-description").hidden = !t.description;
  $("task-size").textContent = `${t.input_size} × ${t.input_size}`;
  $("task-count").textContent = t.labels.length === 1 ? "Its 1 label" : `Its ${t.labels.length} labels`;
  const more = t.labels.length - LABELS_SHOWN;
  $("task-labels").textContent =
    t.labels.slice(0, LABELS_SHOWN).join(", ") + (more > 0 ? `, and ${more} more` : "");
  $("task-labels").title = more > 0 ? t.labels.join(", ") : "";
}

function updateButton() {
  $("go").disabled = !(chosen && tasks[$("task").value]);
}

function choose(file) {
  if (!file) return;
  chosen = file;
  $("preview").src = URL.createObjectURL(file);
  updateButton();
  if (tasks[$("task").value]) classify();
}

async function classify() {
  const task = $("task").value;
  if (!chosen || !tasks[task]) return;
  $("error").hidden = true;
  $("go").disabled = true;
  setState("busy");
  const started = performance.now();
  try {
    const response = await fetch(`/predict?task=${encodeURIComponent(task)}&top_k=${TOP_K}`, {
      method: "POST",
      body: chosen,
      headers: { "content-type": chosen.type || "application/octet-stream" },
    });
    if (!response.ok) {
      $("output").hidden = true;
      const { plain, detail } = await errorOf(response);
      showError(plain, detail);
      return;
    }
    const answer = await response.json();
    render(answer, performance.now() - started);
    setState("done");
  } catch (err) { // fetch itself failed: no answer came back
    $("output").hidden = true;
    showError(NETWORK_ERROR, err.message);
  } finally {
    updateButton();
  }
}

function render(answer, roundTripMs) {
  const top = answer.results[0].top;
  const rows = top.map((s) => {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = s.label;
    label.title = s.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", `${(100 * s.score).toFixed(1)} percent`);
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0.5, 100 * s.score).toFixed(1)}%`;
    bar.append(fill);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = s.score.toFixed(3);
    li.append(label, bar, score);
    return li;
  });
  $("top").replaceChildren(...rows);
  $("result-task").textContent = answer.task;
  $("latency").textContent =
    `server ${answer.latency_ms.toFixed(1)} ms · round trip ${roundTripMs.toFixed(1)} ms`;
  $("output").hidden = false;
}

function wireDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    choose(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.kind === "file");
    if (item) choose(item.getAsFile());
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("file").addEventListener("change", (e) => choose(e.target.files[0]));
  $("task").addEventListener("change", () => { describeTask(); updateButton(); if (chosen) classify(); });
  $("form").addEventListener("submit", (e) => { e.preventDefault(); classify(); });
  wireDrop();
  loadTasks();
});
