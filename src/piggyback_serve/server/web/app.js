// The try-it page: no build step, no dependencies. Talks to the native JSON API.
"use strict";

const $ = (id) => document.getElementById(id);
const TOP_K = 5;
let tasks = {};
let chosen = null; // the File (or Blob) to classify

function setState(state) { document.body.dataset.state = state; }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  setState("error");
}

// The server's own message when it sent one ({"error": {"code", "message"}}).
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error) {
      const e = body.error;
      return typeof e === "string" ? e : `${e.message} (${e.code}, HTTP ${response.status})`;
    }
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status} ${response.statusText}`;
}

async function loadTasks() {
  const select = $("task");
  try {
    const response = await fetch("/tasks");
    if (!response.ok) throw new Error(await errorOf(response));
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
    select.replaceChildren(new Option("tasks unavailable", ""));
    showError(`Could not list the tasks: ${err.message}`);
  }
  updateButton();
}

function describeTask() {
  const t = tasks[$("task").value];
  $("task-info").textContent = t
    ? `${t.labels.slice(0, 8).join(", ")}${t.labels.length > 8 ? ", …" : ""} · backbone ${t.backbone}`
    : "";
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
      showError(await errorOf(response));
      return;
    }
    const answer = await response.json();
    render(answer, performance.now() - started);
    setState("done");
  } catch (err) {
    showError(`The request failed: ${err.message}`);
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
