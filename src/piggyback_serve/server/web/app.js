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

// The task list, again: `pick` names a task to select (one just learned), else the URL's ?task=.
// Answers true when the list came back.
async function loadTasks(pick) {
  const select = $("task");
  try {
    const response = await fetch("/tasks");
    if (!response.ok) throw await errorOf(response);
    const list = (await response.json()).tasks;
    tasks = Object.fromEntries(list.map((t) => [t.name, t]));
    select.replaceChildren(...list.map((t) => new Option(`${t.name} (${t.labels.length} labels)`, t.name)));
    if (!list.length) select.replaceChildren(new Option("no tasks registered", ""));
    const wanted = pick || new URLSearchParams(location.search).get("task");
    if (wanted && tasks[wanted]) select.value = wanted;
    select.disabled = !list.length;
    describeTask();
    setState("ready");
    updateButton();
    return true;
  } catch (err) {
    // errorOf's {plain, detail}, or fetch's own failure (no answer came back).
    const { plain, detail } = err.plain ? err : { plain: NETWORK_ERROR, detail: err.message };
    select.replaceChildren(new Option("tasks unavailable", ""));
    showError(`Could not load the tasks. ${plain}`, detail);
  }
  updateButton();
  return false;
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
  wireLearn();
  loadTasks();
});

// ---- Learn a task ------------------------------------------------------------------
// A folder (packed here into an uncompressed tar) or an archive goes to
// POST /tasks/{name}/train; the job is then followed with Server-Sent Events
// (GET /jobs/{id}/events, one `job` event per change, the Job JSON as its data).

const TASK_NAME = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const TOKEN_KEY = "piggyback-serve.admin-token";
let learnSource = null; // {kind: "folder", root, entries: [{path, file}]} or {kind: "archive", file}
let learnJob = null; // the id of the job this page follows
let learnDone = null; // the id of the last job whose end the page has shown
let learnEvents = null; // its EventSource
let learnPoll = null; // or the timer that polls GET /jobs/{id} when events cannot be had

// -- a POSIX ustar writer: a 512-byte header per file, its bytes padded to 512, two zero
// blocks at the end. The files' bytes are not read here: the Blob refers to them.
const BLOCK = 512;
const utf8 = new TextEncoder();

function octal(value, width) { // `width` bytes with the NUL that ends them
  const digits = Math.trunc(value).toString(8);
  if (digits.length > width - 1) throw new Error(`${value} does not fit a tar header`);
  return digits.padStart(width - 1, "0");
}

// ustar keeps a path as a name (100 bytes) and a prefix (155 bytes), split at a "/".
function splitPath(path) {
  const whole = utf8.encode(path);
  if (whole.length <= 100) return [new Uint8Array(0), whole];
  for (let i = path.lastIndexOf("/"); i > 0; i = path.lastIndexOf("/", i - 1)) {
    const prefix = utf8.encode(path.slice(0, i));
    const name = utf8.encode(path.slice(i + 1));
    if (name.length > 100) break; // further left only makes the name longer
    if (prefix.length <= 155 && name.length > 0) return [prefix, name];
  }
  throw new Error(`this path is too long for a tar file: ${path}`);
}

function tarHeader(path, size, mtime) {
  const header = new Uint8Array(BLOCK);
  const put = (offset, value) =>
    header.set(typeof value === "string" ? utf8.encode(value) : value, offset);
  const [prefix, name] = splitPath(path);
  put(0, name);
  put(100, "0000644\0"); // mode
  put(108, "0000000\0"); // uid
  put(116, "0000000\0"); // gid
  put(124, octal(size, 12) + "\0");
  put(136, octal(mtime, 12) + "\0");
  put(148, "        "); // the checksum is summed with its own field as spaces
  put(156, "0"); // a regular file
  put(257, "ustar\0");
  put(263, "00");
  put(345, prefix);
  const sum = header.reduce((total, byte) => total + byte, 0);
  put(148, octal(sum, 7) + "\0 ");
  return header;
}

// [{path, file}] -> a tar Blob with those files at those paths.
function packTar(entries) {
  const parts = [];
  for (const { path, file } of entries) {
    const mtime = Math.max(0, Math.floor((file.lastModified || 0) / 1000));
    parts.push(tarHeader(path, file.size, mtime), file);
    const pad = (BLOCK - (file.size % BLOCK)) % BLOCK;
    if (pad) parts.push(new Uint8Array(pad));
  }
  parts.push(new Uint8Array(2 * BLOCK));
  return new Blob(parts, { type: "application/x-tar" });
}

// The files of a picked folder, by the path below the folder's parent (webkitRelativePath
// starts with the picked folder's name: the label folders sit one level deep, which the
// server accepts). Hidden files (.DS_Store, macOS's ._ files) are left out.
function folderEntries(files) {
  return [...files]
    .map((file) => ({ path: file.webkitRelativePath || file.name, file }))
    .filter(({ path }) => !path.split("/").some((part) => part.startsWith(".")))
    .sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
}

// -- the admin token, kept for this tab only
function adminToken() { return $("token").value.trim(); }
function authHeaders() {
  const token = adminToken();
  return token ? { authorization: `Bearer ${token}` } : {};
}
function keepToken() {
  try {
    if (adminToken()) sessionStorage.setItem(TOKEN_KEY, adminToken());
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch (_) { /* storage refused: the field still works for this page */ }
}
function restoreToken() {
  try { $("token").value = sessionStorage.getItem(TOKEN_KEY) || ""; } catch (_) { /* none */ }
}

// -- what the panel shows
function setLearnState(state) { $("learn").dataset.state = state; }

function learnError(plain, detail) {
  $("learn-error-text").textContent = plain;
  $("learn-error-detail").textContent = detail || "";
  $("learn-error-detail").hidden = !detail;
  $("learn-error").hidden = false;
}

const LEARN_PLAIN_BY_STATUS = {
  400: "The server refused these options.",
  401: "This server needs its admin token to learn a task: enter it in the Admin token field.",
  403: "The admin token is wrong.",
  404: "This server cannot learn tasks.",
  409: "This job has already finished.",
  413: "This archive is too large for the server.",
  422: "The server cannot learn from these images.",
  500: "Something went wrong on the server. Try again.",
  503: "The server is not ready to learn a task. Try again in a moment.",
};

// A failed answer as {plain, detail}: a sentence, and the server's own message, both shown
// (the server's words say which class, which file, which limit).
async function learnErrorOf(response) {
  let detail = `HTTP ${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error) {
      const e = body.error;
      detail = typeof e === "string" ? e : `${e.message} (${e.code}, HTTP ${response.status})`;
    }
  } catch (_) { /* not JSON */ }
  const plain = LEARN_PLAIN_BY_STATUS[response.status] ||
    `Something went wrong (HTTP ${response.status}).`;
  return { plain, detail };
}

function suggestName(from) {
  const field = $("learn-name");
  if (field.value && field.dataset.suggested !== field.value) return; // typed by the user
  const name = from.replace(/\.(zip|tar|tgz|tar\.gz)$/i, "").replace(/[^A-Za-z0-9_-]+/g, "-")
    .replace(/^[^A-Za-z0-9]+/, "").slice(0, 64);
  if (!TASK_NAME.test(name)) return;
  field.value = name;
  field.dataset.suggested = name;
}

function pickFolder() {
  const files = $("learn-folder").files;
  $("learn-archive").value = "";
  const entries = folderEntries(files || []);
  if (!entries.length) {
    learnSource = null;
    $("learn-picked").textContent = files && files.length ? "This folder has no files to send." : "";
    return;
  }
  const root = entries[0].path.split("/")[0];
  const labels = new Set(entries.map((e) => e.path.split("/")).filter((p) => p.length >= 3)
    .map((p) => p[1]));
  learnSource = { kind: "folder", root, entries };
  const bytes = entries.reduce((total, e) => total + e.file.size, 0);
  const names = [...labels].sort();
  $("learn-picked").textContent = `${root}: ${entries.length} files (${formatBytes(bytes)}) in ` +
    `${names.length} label folder${names.length === 1 ? "" : "s"}` +
    (names.length ? `: ${names.slice(0, LABELS_SHOWN).join(", ")}` : "") +
    (names.length > LABELS_SHOWN ? `, and ${names.length - LABELS_SHOWN} more` : "");
  suggestName(root);
}

function pickArchive() {
  const file = $("learn-archive").files[0];
  $("learn-folder").value = "";
  learnSource = file ? { kind: "archive", file } : null;
  $("learn-picked").textContent = file ? `${file.name} (${formatBytes(file.size)})` : "";
  if (file) suggestName(file.name);
}

function formatBytes(n) {
  if (n < 1024) return `${n} bytes`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}

const percent = (x) => `${(100 * x).toFixed(1)}%`;

const WHOLE_NUMBERS = [
  ["learn-epochs", "epochs", "Epochs"],
  ["learn-min-steps", "min_steps", "Steps at least"],
  ["learn-input-size", "input_size", "Input size"],
];

async function learn() {
  $("learn-error").hidden = true;
  const name = $("learn-name").value.trim();
  if (!learnSource) {
    learnError("Pick a folder of images (one sub-folder per label) or an archive first.");
    return;
  }
  if (!TASK_NAME.test(name)) {
    learnError("The task name must be 1 to 64 letters, digits, _ or -, starting with a letter or digit.");
    $("learn-name").focus();
    return;
  }
  const params = new URLSearchParams();
  for (const [id, key, label] of WHOLE_NUMBERS) {
    const value = $(id).value.trim();
    if (!value && $(id).validity.badInput) {
      learnError(`${label} must be a whole number.`);
      return;
    }
    if (!value) continue;
    if (!/^\d+$/.test(value)) {
      learnError(`${label} must be a whole number.`);
      $(id).focus();
      return;
    }
    params.set(key, value);
  }
  const description = $("learn-description").value.trim();
  if (description) params.set("description", description);

  let body;
  try {
    body = learnSource.kind === "folder" ? packTar(learnSource.entries) : learnSource.file;
  } catch (err) {
    learnError(`Could not pack the folder: ${err.message}`);
    return;
  }
  stopFollowing();
  $("learn-go").disabled = true;
  $("learn-job").hidden = true;
  setLearnState("sending");
  try {
    const response = await fetch(`/tasks/${encodeURIComponent(name)}/train?${params}`, {
      method: "POST",
      body,
      headers: { ...authHeaders(), "content-type": body.type || "application/octet-stream" },
    });
    if (!response.ok) {
      const { plain, detail } = await learnErrorOf(response);
      learnError(plain, detail);
      setLearnState("error");
      $("learn-go").disabled = false;
      return;
    }
    follow(await response.json());
  } catch (err) { // fetch itself failed: no answer came back
    learnError(NETWORK_ERROR, err.message);
    setLearnState("error");
    $("learn-go").disabled = false;
  }
}

function stopFollowing() {
  if (learnEvents) learnEvents.close();
  learnEvents = null;
  clearTimeout(learnPoll);
  learnPoll = null;
}

function follow(job) {
  stopFollowing();
  learnJob = job.id;
  showJob(job);
  if (FINAL.has(job.state)) { finished(job); return; }
  const source = new EventSource(`/jobs/${encodeURIComponent(job.id)}/events`);
  learnEvents = source;
  source.addEventListener("job", (event) => {
    let update;
    try { update = JSON.parse(event.data); } catch (_) { return; }
    if (learnEvents !== source || update.id !== learnJob) return;
    showJob(update);
    if (FINAL.has(update.state)) { stopFollowing(); finished(update); }
  });
  source.addEventListener("error", () => {
    // A dropped stream reconnects by itself; one the browser gave up on (an answer that is
    // not an event stream, e.g. a 401) is replaced by polling, which can send the token.
    if (learnEvents === source && source.readyState === EventSource.CLOSED) {
      learnEvents = null;
      poll(job.id, 0);
    }
  });
}

async function poll(id, failures) {
  if (learnJob !== id || learnDone === id) return;
  try {
    const response = await fetch(`/jobs/${encodeURIComponent(id)}`, { headers: authHeaders() });
    if (!response.ok) {
      const { plain, detail } = await learnErrorOf(response);
      learnError(`Lost track of the job. ${plain}`, detail);
      setLearnState("error");
      $("learn-go").disabled = false;
      return;
    }
    const job = await response.json();
    if (learnJob !== id) return;
    showJob(job);
    if (FINAL.has(job.state)) { finished(job); return; }
    failures = 0;
  } catch (err) {
    if (failures >= 30) {
      learnError(`Lost track of the job. ${NETWORK_ERROR}`, err.message);
      setLearnState("error");
      $("learn-go").disabled = false;
      return;
    }
    failures += 1;
  }
  learnPoll = setTimeout(() => poll(id, failures), 1000);
}

function showJob(job) {
  $("learn-job").hidden = false;
  $("learn-task").textContent = job.task;
  $("learn-state").textContent = job.state;
  if (!FINAL.has(job.state)) setLearnState(job.state);
  const p = job.progress || {};
  const bar = $("learn-progress");
  if (job.state === "succeeded") {
    bar.max = 1;
    bar.value = 1;
  } else if (p.steps > 0) {
    bar.max = p.steps;
    bar.value = Math.min(p.step || 0, p.steps);
  } else if (FINAL.has(job.state)) {
    bar.max = 1;
    bar.value = 0;
  } else {
    bar.removeAttribute("value"); // indeterminate: waiting, or the steps not known yet
  }
  const said = [];
  if (p.epochs > 0) said.push(`epoch ${p.epoch || 0} of ${p.epochs}`);
  if (p.steps > 0) said.push(`step ${p.step || 0} of ${p.steps}`);
  if (typeof p.loss === "number") said.push(`loss ${p.loss.toFixed(4)}`);
  $("learn-progress-text").textContent = said.length ? said.join(" · ")
    : job.state === "queued" ? "waiting for a free trainer…" : job.state === "running" ? "starting…" : "";
  const data = job.data;
  $("learn-data").hidden = !(data && data.classes);
  if (data && data.classes) {
    const n = data.classes.length;
    $("learn-data").textContent = `${data.images} images, ${n} label${n === 1 ? "" : "s"}: ` +
      data.classes.slice(0, LABELS_SHOWN).join(", ") +
      (n > LABELS_SHOWN ? `, and ${n - LABELS_SHOWN} more` : "") +
      (data.skipped ? ` (${data.skipped} other file${data.skipped === 1 ? "" : "s"} skipped)` : "");
  }
  $("learn-cancel").hidden = FINAL.has(job.state);
  $("learn-result").hidden = true;
}

async function finished(job) {
  if (learnDone === job.id) return;
  learnDone = job.id;
  $("learn-cancel").hidden = true;
  $("learn-go").disabled = false;
  if (job.state === "succeeded") {
    const r = job.result || {};
    $("learn-accuracy").textContent = typeof r.accuracy === "number" ? percent(r.accuracy) : "?";
    $("learn-baseline").textContent =
      typeof r.baseline_accuracy === "number" ? percent(r.baseline_accuracy) : "not measured";
    $("learn-size").textContent = typeof r.size_bytes === "number" ? formatBytes(r.size_bytes) : "";
    $("learn-sparsity").textContent = typeof r.sparsity === "number" ? percent(r.sparsity) : "?";
    $("learn-next").textContent = "Loading the task list…";
    $("learn-result").hidden = false;
    // The new task into the predict form, so it can be tried at once (a few tries: another
    // replica may serve the list a moment before it has the task).
    let listed = false;
    for (let i = 0; i < 20 && !listed; i++) {
      listed = (await loadTasks(job.task)) && Boolean(tasks[job.task]);
      if (!listed) await new Promise((resolve) => setTimeout(resolve, 250));
    }
    $("learn-next").textContent = listed
      ? `“${job.task}” is selected in the form above: give it an image to try it.`
      : `“${job.task}” is not in the task list yet: reload the page in a moment.`;
  } else {
    const e = job.error;
    const plain = job.state === "cancelled" ? "The job was cancelled." : "The job failed.";
    learnError(plain, e ? (e.message ? `${e.message} (${e.code})` : String(e)) : "");
  }
  setLearnState(job.state);
}

async function cancelJob() {
  const id = learnJob;
  if (!id || learnDone === id) return;
  $("learn-cancel").disabled = true;
  try {
    const response = await fetch(`/jobs/${encodeURIComponent(id)}`, {
      method: "DELETE",
      headers: authHeaders(),
    });
    if (response.ok) {
      const job = await response.json();
      if (learnJob === id && learnDone !== id) {
        showJob(job);
        if (FINAL.has(job.state)) { stopFollowing(); finished(job); }
      }
    } else if (response.status !== 409) { // 409: it had finished; its last event says how
      const { plain, detail } = await learnErrorOf(response);
      learnError(`Could not cancel the job. ${plain}`, detail);
    }
  } catch (err) {
    learnError(`Could not cancel the job. ${NETWORK_ERROR}`, err.message);
  } finally {
    $("learn-cancel").disabled = false;
  }
}

function wireLearn() {
  restoreToken();
  $("token").addEventListener("input", keepToken);
  $("learn-folder").addEventListener("change", pickFolder);
  $("learn-archive").addEventListener("change", pickArchive);
  $("learn-form").addEventListener("submit", (e) => { e.preventDefault(); learn(); });
  $("learn-cancel").addEventListener("click", cancelJob);
}
