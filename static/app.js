// The dashboard's script: signs in if the server asks for a token, polls GET /stats (counts,
// chart, workers), GET /queues (each queue's state and limits) and GET /schedules, follows
// every job change on one EventSource (/feed), and sends the buttons' POSTs, the limits' and
// schedules' PUTs and a schedule's DELETE. Job data only ever goes into the page through
// textContent, never as HTML.
"use strict";

const STATES = ["queued", "delayed", "running", "done", "failed", "cancelled"];
const CANCELLABLE = new Set(["queued", "delayed", "running"]);
const RETRYABLE = new Set(["failed", "cancelled"]);
const STATS_EVERY = 2000; // ms between the end of one GET /stats and the next
const MAX_ROWS = 200; // rows kept in the jobs table as new jobs arrive
const PAGE = 50; // jobs asked for per GET /jobs
const SHOWN = 256; // characters of an input or result shown (GET /jobs cuts them to 256 bytes)
// A queue's limits as GET /queues/NAME shows them, and the form's inputs for each.
const LIMITS = ["rate_limit", "concurrency", "group_rate_limit", "group_concurrency"];
const INPUTS = {
  rate_limit: ["#limit-rate-jobs", "#limit-rate-per"],
  concurrency: ["#limit-concurrency"],
  group_rate_limit: ["#limit-group-rate-jobs", "#limit-group-rate-per"],
  group_concurrency: ["#limit-group-concurrency"],
};

const $ = (selector) => document.querySelector(selector);

class Unauthorized extends Error {}

// The page's state: what is running, and the rows of the jobs table by job id.
const state = {
  running: false,
  feed: null,
  feedLost: false,
  statsTimer: 0,
  statsBusy: false, // a GET /stats is on its way
  statsAgain: false, // ... and another was asked for meanwhile
  statsFailed: false,
  noticeTimer: 0,
  filter: "", // "" = the newest jobs of every state; else one state
  queue: "default", // the queue the counts and the jobs table show
  cursor: null,
  limit: MAX_ROWS,
  rows: new Map(), // id -> {tr, job}
  needInput: [], // ids whose row came from /feed, which does not carry the input
  fetchingInput: false,
  queues: new Map(), // name -> the queue as GET /queues last showed it
  editing: null, // the queue whose limits the form shows
  output: null, // the EventSource of the job whose output the panel shows
};

// ---- talking to the server ----

async function api(method, path, body) {
  // The calls about jobs name the queue shown (none: the default one).
  if (state.queue !== "default" && /^\/(jobs|status|stats)/.test(path)) {
    path += `${path.includes("?") ? "&" : "?"}queue=${encodeURIComponent(state.queue)}`;
  }
  if (state.queue !== "default" && path === "/submit") body = { ...body, queue: state.queue };
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  if (response.status === 401 && path !== "/login") {
    signedOut();
    throw new Unauthorized("sign in needed");
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = new Error((data && data.error) || `${method} ${path}: ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

// One line in the header; a message about an action fades after a while, a lasting problem
// (the server unreachable) stays until it is over.
function notify(text, isError = false, lasting = false) {
  const notice = $("#notice");
  notice.textContent = text;
  notice.classList.toggle("error", isError);
  clearTimeout(state.noticeTimer);
  if (text && !lasting) state.noticeTimer = setTimeout(() => notify(""), 8000);
}

// Errors of actions the user took are shown; a 401 has already brought back the sign-in box.
function report(error) {
  if (!(error instanceof Unauthorized)) notify(error.message, true);
}

// ---- sign-in ----

async function start() {
  stop();
  let auth;
  try {
    auth = await api("GET", "/auth");
  } catch (error) {
    if (!(error instanceof Unauthorized)) {
      notify(`cannot reach the server: ${error.message}`, true, true);
      setTimeout(start, 3000);
    }
    return;
  }
  $("#signin").hidden = true;
  $("#app").hidden = false;
  $("#signout").hidden = auth.auth !== "ok";
  $("#live").hidden = false;
  notify("");
  state.running = true;
  openFeed(); // its onopen reads the jobs
  pollStats();
}

function stop() {
  state.running = false;
  clearTimeout(state.statsTimer);
  if (state.feed) state.feed.close();
  state.feed = null;
  closeOutput();
  setLive("off");
}

function signedOut() {
  stop();
  $("#app").hidden = true;
  $("#signout").hidden = true;
  $("#live").hidden = true;
  $("#signin").hidden = false;
  $("#token-input").focus();
}

async function signIn(event) {
  event.preventDefault();
  const input = $("#token-input");
  const message = $("#signin-error");
  message.textContent = "";
  try {
    await api("POST", "/login", { token: input.value });
  } catch (error) {
    message.textContent = error.status === 401 ? "That token is not right." : error.message;
    input.select();
    return;
  }
  input.value = ""; // the server keeps it in an HttpOnly cookie; the page keeps nothing
  start();
}

async function signOut(event) {
  event.preventDefault();
  try {
    await api("POST", "/logout");
  } catch (error) {
    report(error);
    return;
  }
  signedOut();
}

// ---- GET /stats: counts, facts, chart, workers ----

async function pollStats() {
  clearTimeout(state.statsTimer);
  if (state.statsBusy) {
    state.statsAgain = true;
    return;
  }
  if (!state.running) return;
  state.statsBusy = true;
  try {
    const [stats, { queues }, { schedules }] = await Promise.all(
      [api("GET", "/stats"), api("GET", "/queues"), api("GET", "/schedules")]);
    showStats(stats, queues);
    showSchedules(schedules);
    if (state.statsFailed) notify("");
    state.statsFailed = false;
  } catch (error) {
    if (!(error instanceof Unauthorized)) {
      notify(`cannot read /stats: ${error.message}`, true, true);
      state.statsFailed = true;
    }
  } finally {
    state.statsBusy = false;
  }
  if (state.statsAgain) {
    state.statsAgain = false;
    pollStats();
  } else if (state.running) {
    state.statsTimer = setTimeout(pollStats, STATS_EVERY);
  }
}

function showQueues(names) {
  const picker = $("#queue-select");
  const all = [...new Set(["default", ...names, state.queue])].sort();
  if ([...picker.options].map((o) => o.value).join() === all.join()) return;
  picker.replaceChildren(...all.map((name) => new Option(name, name, false,
                                                          name === state.queue)));
  picker.hidden = all.length < 2;
}

function chooseQueue() {
  state.queue = $("#queue-select").value;
  loadJobs();
  pollStats();
}

function showStats(all, queues) {
  showQueues(queues.map((q) => q.name));
  showQueueTable(queues);
  // Counts of the queue shown; the chart and the workers of every queue (for the default).
  const stats = { ...all, ...((all.queues || {})[state.queue] || {}) };
  for (const status of STATES) setText(`#count-${status}`, number(stats.jobs[status]));
  setText("#queue-length", number(stats.queue_length));
  setText("#delayed-length", number(stats.delayed));
  setText("#dead-letter", number(stats.dead_letter));
  setText("#held-back", number(stats.held_back) + (stats.paused ? " (paused)" : ""));
  setText("#oldest-queued", stats.oldest_queued_age == null ? "–" : age(stats.oldest_queued_age));
  for (const [name, value] of Object.entries(stats.totals)) {
    setText(`#total-${name}`, number(value));
  }
  const { used_memory: used, maxmemory: max } = stats.redis;
  setText("#redis-memory", `${bytes(used)} / ${max ? bytes(max) : "no limit"}`);
  drawChart(stats.done_per_minute);
  showWorkers(stats.workers);
}

// ---- GET /queues: each queue's state and limits; pause, resume, and the limits form ----

function limitText(value) {
  if (value == null) return "–";
  return typeof value === "object" ? `${number(value.jobs)} per ${value.per} s` : number(value);
}

function showQueueTable(queues) {
  state.queues = new Map(queues.map((q) => [q.name, q]));
  const rows = queues.map((q) => {
    const tr = document.createElement("tr");
    tr.dataset.queue = q.name;
    const paused = cell(q.paused ? "paused" : "active", `state state-${q.paused ? "paused" : "active"}`);
    const limits = LIMITS.map((name) => {
      const td = cell(limitText(q.settings[name]), q.settings[name] == null ? "num none" : "num");
      td.title = name.replaceAll("_", " ");
      return td;
    });
    const actions = cell("", "actions");
    actions.append(
      q.paused ? button("resume", "Resume", () => pauseQueue(q.name, "resume"))
               : button("pause", "Pause", () => pauseQueue(q.name, "pause")),
      button("limits", "Limits", () => editLimits(q.name)));
    tr.append(cell(q.name, "name"), paused, cell(number(q.length), "num"),
              cell(number(q.running), "num"), cell(number(q.held_back), "num"), ...limits,
              actions);
    return tr;
  });
  $("#queues tbody").replaceChildren(...rows);
}

async function pauseQueue(name, action) {
  try {
    const queue = await api("POST", `/queues/${encodeURIComponent(name)}/${action}`);
    notify(`queue ${name} ${queue.paused ? "paused: it starts no job until resumed" : "resumed"}`);
  } catch (error) {
    report(error);
  }
  pollStats();
}

// The form shows the queue's limits now; an empty input is no such limit.
function editLimits(name) {
  const queue = state.queues.get(name);
  if (!queue) return;
  state.editing = name;
  $("#limits-queue").textContent = name;
  for (const limit of LIMITS) {
    const value = queue.settings[limit];
    const [first, second] = INPUTS[limit];
    if (second) {
      $(first).value = value ? value.jobs : "";
      $(second).value = value ? value.per : "";
    } else {
      $(first).value = value ?? "";
    }
  }
  $("#limits-form").hidden = false;
  $(INPUTS.rate_limit[0]).focus();
}

// PUT every limit the form shows (an empty one removes it): 400 if one is wrong, and then the
// server changed none.
async function saveLimits(event) {
  event.preventDefault();
  const body = {};
  for (const limit of LIMITS) {
    const [first, second] = INPUTS[limit].map((selector) => $(selector).value);
    if (INPUTS[limit].length === 1) {
      body[limit] = first === "" ? null : Number(first);
    } else if (first === "" && second === "") {
      body[limit] = null;
    } else {
      body[limit] = { jobs: Number(first), per: second === "" ? NaN : Number(second) };
      if (first === "" || second === "") {
        notify(`${limit.replace("_", " ")}: give both the jobs and the seconds, or neither`, true);
        return;
      }
    }
  }
  try {
    await api("PUT", `/queues/${encodeURIComponent(state.editing)}`, body);
    notify(`limits of ${state.editing} saved`);
    $("#limits-form").hidden = true;
  } catch (error) {
    report(error);
  }
  pollStats();
}

// ---- GET /schedules: each schedule's ticks and runs; pause, resume, delete, and a form to add
// one (PUT /schedules/NAME) ----

function period(seconds) {
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["min", 60]]) {
    if (seconds >= size && seconds % size === 0) return `every ${seconds / size} ${unit}`;
  }
  return `every ${seconds} s`;
}

// When the next run is: within the hour, its time and how soon; else its date and time, in
// the schedule's own zone (as the server gives it, which the title shows whole).
function nextRun(time) {
  const seconds = Math.round((Date.parse(time) - Date.now()) / 1000);
  if (Number.isNaN(seconds)) return time;
  if (seconds >= 3600) return time.slice(0, 16).replace("T", " ");
  const clockTime = time.slice(11, time.slice(17, 19) === "00" ? 16 : 19);
  const soon = seconds < 1 ? "due" : seconds < 60 ? `in ${seconds} s`
    : `in ${Math.round(seconds / 60)} min`;
  return `${clockTime} (${soon})`;
}

function showSchedules(schedules) {
  const rows = schedules.map((s) => {
    const tr = document.createElement("tr");
    tr.dataset.schedule = s.name;
    const when = s.cron != null ? cell(s.cron, "when cron") : cell(period(s.every), "when");
    if (s.cron != null) {
      const zone = document.createElement("span");
      zone.className = "zone";
      zone.textContent = ` ${s.timezone}`;
      when.append(zone);
    }
    when.title = s.cron != null ? `cron ${s.cron}, in ${s.timezone}` : `every ${s.every} s`;
    if (s.overlap === "skip") when.title += "; no job while the last one runs";
    const input = cell(clip(s.input), "text");
    input.title = s.input;
    const next = cell(s.paused ? "–" : nextRun(s.next_run), "time next");
    next.title = s.next_run;
    const state = cell(s.paused ? "paused" : "active",
                       `state state-${s.paused ? "paused" : "active"}`);
    const last = cell("", "id last");
    if (s.last_job) { // the job as the server shows it (GET /status)
      const link = document.createElement("a");
      link.href = `/status?id=${encodeURIComponent(s.last_job)}` +
        (s.queue === "default" ? "" : `&queue=${encodeURIComponent(s.queue)}`);
      link.target = "_blank";
      link.rel = "noopener";
      link.textContent = s.last_job.slice(0, 8);
      link.title = s.last_job;
      last.append(link);
    } else {
      last.textContent = "–";
    }
    const actions = cell("", "actions");
    actions.append(
      s.paused ? button("resume", "Resume", () => scheduleAction(s.name, "resume"))
               : button("pause", "Pause", () => scheduleAction(s.name, "pause")),
      button("delete", "Delete", () => scheduleAction(s.name, "delete")));
    tr.append(cell(s.name, "name"), when, cell(s.queue, "queue"), input, next, state,
              cell(number(s.runs), "num runs"), last, actions);
    return tr;
  });
  $("#schedules tbody").replaceChildren(...rows);
  $("#schedules-empty").hidden = schedules.length > 0;
}

async function scheduleAction(name, action) {
  const path = `/schedules/${encodeURIComponent(name)}`;
  try {
    if (action === "delete") {
      await api("DELETE", path);
      notify(`schedule ${name} deleted (the jobs it made stay)`);
    } else {
      const schedule = await api("POST", `${path}/${action}`);
      notify(`schedule ${name} ${schedule.paused ? "paused: its ticks make no job" : "resumed"}`);
    }
  } catch (error) {
    report(error);
  }
  pollStats();
}

function chooseScheduleKind() {
  const cron = $("#schedule-kind").value === "cron";
  $("#schedule-when").placeholder = cron ? "*/5 * * * *" : "seconds, like 60";
  $("#schedule-timezone").hidden = !cron;
}

// PUT /schedules/NAME: created (or replaced, for a name in use); the server says what is wrong.
async function addSchedule(event) {
  event.preventDefault();
  const name = $("#schedule-name");
  const when = $("#schedule-when").value.trim();
  const zone = $("#schedule-timezone").value.trim();
  const queue = $("#schedule-queue").value.trim();
  const body = { input: $("#schedule-input").value };
  if ($("#schedule-kind").value === "cron") {
    body.cron = when;
    if (zone) body.timezone = zone;
  } else {
    body.every = Number(when);
  }
  if (queue) body.queue = queue;
  const message = $("#schedule-message");
  message.classList.remove("error");
  try {
    const schedule = await api("PUT", `/schedules/${encodeURIComponent(name.value)}`, body);
    message.textContent = `schedule ${schedule.name}: next run ${nextRun(schedule.next_run)}`;
    for (const id of ["#schedule-name", "#schedule-when", "#schedule-input"]) $(id).value = "";
  } catch (error) {
    if (error instanceof Unauthorized) return;
    message.textContent = error.message;
    message.classList.add("error");
  }
  pollStats();
}

const SVG = "http://www.w3.org/2000/svg";

function svg(name, attributes) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  return element;
}

// One stacked bar a minute: done (green) below failed (red), scaled to the busiest minute.
function drawChart(minutes) {
  const chart = $("#chart");
  // Drawn in the chart's own pixels, so text and bars are never stretched.
  const width = Math.round(chart.clientWidth) || 600, height = Math.round(chart.clientHeight) || 160;
  const top = 16;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const slot = width / Math.max(minutes.length, 1);
  const peak = Math.max(1, ...minutes.map((m) => m.done + m.failed));
  const scale = (height - top) / peak;
  const parts = [
    svg("line", { x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5, class: "baseline" }),
    svg("line", { x1: 0, y1: top, x2: width, y2: top, class: "gridline" }),
  ];
  const label = svg("text", { x: 2, y: top - 4, class: "peak" });
  label.textContent = `${number(peak)}/min`;
  parts.push(label);
  minutes.forEach((m, i) => {
    const x = i * slot + slot * 0.15, w = slot * 0.7;
    const done = m.done * scale, failed = m.failed * scale;
    const group = svg("g", {});
    const title = svg("title", {});
    title.textContent = `${clock(m.minute, false)}: ${m.done} done, ${m.failed} failed`;
    group.append(title);
    group.append(svg("rect", { x, y: 0, width: slot, height, class: "hover" }));
    if (done) group.append(svg("rect", { x, y: height - done, width: w, height: done, class: "done" }));
    if (failed) {
      group.append(svg("rect", { x, y: height - done - failed, width: w, height: failed,
                                 class: "failed" }));
    }
    parts.push(group);
  });
  chart.replaceChildren(...parts);
}

function showWorkers(workers) {
  const rows = workers.map((w) => {
    const tr = document.createElement("tr");
    tr.dataset.name = w.name;
    const running = document.createElement("td");
    running.className = "ids";
    running.textContent = `${w.running.length}/${w.concurrency}`;
    for (const id of w.running) {
      const code = document.createElement("code");
      code.textContent = id.slice(0, 8);
      code.title = id;
      running.append(" ", code);
    }
    const heartbeat = cell(ago(w.last_heartbeat));
    heartbeat.title = w.last_heartbeat;
    const name = cell(w.name, "name");
    name.title = `${w.name}, started ${w.started}`;
    tr.append(name, cell(w.host), cell(String(w.pid)),
              cell(String(w.concurrency)), running, heartbeat);
    return tr;
  });
  $("#workers tbody").replaceChildren(...rows);
  $("#workers-empty").hidden = workers.length > 0;
}

// ---- the jobs table ----

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function button(className, text, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  b.addEventListener("click", action);
  return b;
}

// Is `message` newer than what the row shows? The version says; a row read from GET /jobs
// (whose summaries carry no version) is compared by `updated`, which the server always
// writes in one format (UTC, microseconds), so the strings sort as the times do.
function newer(message, job) {
  if (message.version != null && job.version != null) return message.version > job.version;
  return !job.updated || (message.updated || "") >= job.updated;
}

function renderRow(tr, job) {
  tr.dataset.status = job.status;
  const id = cell(job.id.slice(0, 8), "id");
  id.title = job.id;
  const status = cell(job.status, `status status-${job.status}`);
  if (job.status === "running" && job.progress) status.append(progressBar(job.progress));
  const priority = cell(String(job.priority ?? ""), "num priority");
  const group = cell(job.group ?? "", "group");
  group.title = job.group ?? "";
  const input = cell(clip(job.input ?? ""), "text");
  input.title = input.textContent;
  const outcome = clip(job.error && job.status !== "done" ? job.error : job.result || "");
  const result = cell(outcome, job.error && job.status !== "done" ? "text error" : "text");
  result.title = outcome;
  const updated = cell(clock(job.updated, true), "time");
  updated.title = job.updated || "";
  if (job.status === "delayed" && job.run_at) updated.title += ` · due ${job.run_at}`;
  const actions = cell("", "actions");
  if (RETRYABLE.has(job.status)) actions.append(button("retry", "Retry", () => retry(job.id)));
  if (CANCELLABLE.has(job.status)) {
    const cancelButton = button("cancel", "Cancel", () => cancel(job.id));
    if (job.cancel_requested && job.status === "running") {
      cancelButton.disabled = true;
      cancelButton.textContent = "Cancelling";
    }
    actions.append(cancelButton);
  }
  tr.replaceChildren(id, status, priority, group, input, result,
                     cell(String(job.attempts ?? ""), "num"), updated, actions);
}

function addRow(job, atTop) {
  const tr = document.createElement("tr");
  tr.dataset.id = job.id;
  tr.title = "click: the job's live output";
  tr.addEventListener("click", (event) => {
    if (!event.target.closest("button")) showOutput(job.id);
  });
  const entry = { tr, job: { ...job } };
  renderRow(tr, entry.job);
  state.rows.set(job.id, entry);
  const body = $("#jobs tbody");
  if (atTop) body.prepend(tr);
  else body.append(tr);
  return entry;
}

// Drop the oldest rows beyond the limit (they are at the bottom).
function trimRows() {
  const body = $("#jobs tbody");
  while (body.rows.length > state.limit) {
    const last = body.lastElementChild;
    state.rows.delete(last.dataset.id);
    last.remove();
  }
  $("#jobs-empty").hidden = body.rows.length > 0;
}

// A job message (from /feed or a POST's answer): update its row if newer, or add it on top.
function apply(message) {
  const entry = state.rows.get(message.id);
  if (entry) {
    if (!newer(message, entry.job)) return;
    Object.assign(entry.job, message);
    if (!("cancel_requested" in message) && message.status !== "running") {
      delete entry.job.cancel_requested;
    }
    renderRow(entry.tr, entry.job);
  } else if (!state.filter || state.filter === message.status) {
    addRow(message, true);
    if (message.input === undefined) wantInput(message.id);
    trimRows();
  }
}

// /feed messages carry no input: read it from GET /status, a few jobs at a time, the newest
// (top rows) first; a row gone from the table by then is skipped.
function wantInput(id) {
  state.needInput.push(id);
  if (state.needInput.length > MAX_ROWS) state.needInput.shift();
  if (!state.fetchingInput) fillInputs();
}

async function fillInputs() {
  state.fetchingInput = true;
  while (state.running && state.needInput.length) {
    const ids = state.needInput.splice(-4).filter((id) => state.rows.has(id));
    const jobs = await Promise.all(ids.map((id) =>
      api("GET", `/status?id=${encodeURIComponent(id)}`).catch(() => null)));
    for (const job of jobs) {
      const entry = job && state.rows.get(job.id);
      if (!entry) continue;
      entry.job.input = job.input; // these never change
      entry.job.priority = job.priority;
      entry.job.group = job.group;
      if (newer(job, entry.job)) Object.assign(entry.job, job);
      renderRow(entry.tr, entry.job);
    }
  }
  state.needInput = [];
  state.fetchingInput = false;
}

// Fill the table afresh: one state's newest jobs, or the newest of every state.
async function loadJobs() {
  const filter = state.filter;
  let jobs, cursor = null;
  try {
    if (filter) {
      const page = await api("GET", `/jobs?status=${filter}&limit=${PAGE}`);
      jobs = page.jobs;
      cursor = page.next_cursor;
    } else {
      const pages = await Promise.all(
        STATES.map((s) => api("GET", `/jobs?status=${s}&limit=${PAGE}`)));
      jobs = pages.flatMap((page) => page.jobs);
      jobs.sort((a, b) => (a.updated < b.updated ? 1 : a.updated > b.updated ? -1 : 0));
      // A job that changed state while the pages were read is on two of them: its newest once.
      const seen = new Set();
      jobs = jobs.filter((job) => !seen.has(job.id) && seen.add(job.id)).slice(0, MAX_ROWS);
    }
  } catch (error) {
    report(error);
    return;
  }
  if (filter !== state.filter) return; // another tab was chosen meanwhile
  // Keep what /feed already told us about a job when it is newer than this read.
  const known = state.rows;
  state.rows = new Map();
  $("#jobs tbody").replaceChildren();
  state.limit = MAX_ROWS;
  for (const job of jobs) {
    const old = known.get(job.id);
    addRow(old && !newer(job, old.job) ? { ...job, ...old.job } : job, false);
  }
  state.cursor = cursor;
  $("#more").hidden = !cursor;
  trimRows();
}

async function loadMore() {
  const filter = state.filter;
  if (!filter || !state.cursor) return;
  let page;
  try {
    page = await api("GET",
      `/jobs?status=${filter}&limit=${PAGE}&cursor=${encodeURIComponent(state.cursor)}`);
  } catch (error) {
    report(error);
    return;
  }
  if (filter !== state.filter) return;
  for (const job of page.jobs) if (!state.rows.has(job.id)) addRow(job, false);
  state.limit = Math.max(state.limit, state.rows.size);
  state.cursor = page.next_cursor;
  $("#more").hidden = !state.cursor;
  trimRows();
}

function chooseTab(event) {
  const target = event.target.closest("button[data-status]");
  if (!target) return;
  for (const b of document.querySelectorAll("#tabs button")) {
    b.setAttribute("aria-pressed", String(b === target));
  }
  state.filter = target.dataset.status;
  loadJobs();
}

// ---- actions ----

async function retry(id) {
  try {
    apply(await api("POST", `/jobs/${id}/retry`));
  } catch (error) {
    report(error);
  }
}

async function cancel(id) {
  try {
    apply(await api("POST", `/jobs/${id}/cancel`));
  } catch (error) {
    report(error);
  }
}

async function retryAll() {
  try {
    const { retried } = await api("POST", "/jobs/retry-failed");
    notify(`${retried} failed job${retried === 1 ? "" : "s"} queued again`);
  } catch (error) {
    report(error);
  }
}

async function submitJob(event) {
  event.preventDefault();
  const input = $("#submit-input");
  const delay = $("#submit-delay");
  const group = $("#submit-group");
  const body = { input: input.value, priority: Number($("#submit-priority").value) };
  if (delay.value !== "") body.delay = Number(delay.value);
  if (group.value !== "") body.group = group.value;
  const message = $("#submit-message");
  message.classList.remove("error");
  try {
    const job = await api("POST", "/submit", body);
    apply(job);
    message.textContent = `submitted ${job.id.slice(0, 8)} (${job.status})`;
    input.value = "";
  } catch (error) {
    if (error instanceof Unauthorized) return;
    message.textContent = error.message;
    message.classList.add("error");
  }
}

// ---- GET /feed: every job change ----

function setLive(live) {
  const badge = $("#live");
  badge.dataset.state = live;
  badge.textContent = { on: "live", lost: "reconnecting", off: "offline" }[live];
}

function openFeed() {
  const feed = new EventSource("/feed");
  state.feed = feed;
  // The jobs are read once the feed is open, never before: a job that changes meanwhile is
  // then told by the feed, or the read, or both (the newer wins), never by neither.
  feed.onopen = () => {
    setLive("on");
    if (state.feedLost) { // what changed while it was down was not sent: read it again
      state.feedLost = false;
      pollStats();
    }
    loadJobs();
  };
  feed.onmessage = (event) => {
    let messages;
    try {
      messages = JSON.parse(event.data);
    } catch {
      return;
    }
    if (Array.isArray(messages)) {
      for (const m of messages.filter((m) => (m.queue || "default") === state.queue)) {
        if (m.type === "progress") setProgress(m);
        else apply(m);
      }
    }
  };
  feed.onerror = () => {
    if (state.feed !== feed) return;
    state.feedLost = true;
    setLive("lost");
    if (feed.readyState === EventSource.CLOSED) { // refused (say, 401): it will not retry
      feed.close();
      setTimeout(() => {
        if (state.feed === feed && state.running) recheck();
      }, 2000);
    }
  };
}

// A running job's progress ({done, total, message}): a bar under its status.
function progressBar(progress) {
  const box = document.createElement("div");
  box.className = "progress";
  const fraction = progress.total == null ? progress.done
    : progress.total ? progress.done / progress.total : 0;
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.value = Math.max(0, Math.min(fraction, 1));
  const text = progress.total == null ? `${Math.round(bar.value * 100)}%`
    : `${progress.done}/${progress.total}`;
  const words = document.createElement("span");
  words.textContent = progress.message ? `${text} ${progress.message}` : text;
  box.title = words.textContent;
  box.append(bar, words);
  return box;
}

function setProgress(message) {
  const entry = state.rows.get(message.id);
  if (!entry || entry.job.status !== "running") return;
  entry.job.progress = { done: message.done, total: message.total, message: message.message };
  renderRow(entry.tr, entry.job);
}

// ---- one job's live output: its messages from the first (/events?after=0) ----

function showOutput(id) {
  closeOutput();
  const panel = $("#output-panel");
  panel.hidden = false;
  $("#output-id").textContent = id;
  const text = $("#output-text");
  text.textContent = "";
  $("#output-progress").replaceChildren();
  $("#output-status").textContent = "";
  const queue = state.queue === "default" ? "" : `&queue=${encodeURIComponent(state.queue)}`;
  const source = new EventSource(`/events?id=${encodeURIComponent(id)}&after=0${queue}`);
  state.output = source;
  let attempt = null;
  source.onmessage = (event) => {
    let m;
    try {
      m = JSON.parse(event.data);
    } catch {
      return;
    }
    const atBottom = text.scrollTop + text.clientHeight >= text.scrollHeight - 4;
    if (m.type === "output") {
      if (attempt !== null && m.attempt !== attempt) text.append(`\n--- try ${m.attempt} ---\n`);
      attempt = m.attempt;
      text.append(m.data); // a text node: never HTML
    } else if (m.type === "progress") {
      $("#output-progress").replaceChildren(progressBar(m));
    } else if (m.type === "trimmed") {
      text.append(`[${m.missed} earlier messages are no longer kept]\n`);
    } else if (m.status) {
      $("#output-status").textContent = m.status;
      $("#output-status").className = `status status-${m.status}`;
      if (m.status !== "running") $("#output-progress").replaceChildren();
    }
    if (atBottom) text.scrollTop = text.scrollHeight;
  };
  source.onerror = () => { // after the end the server answers 204: it stops for good
    if (source.readyState === EventSource.CLOSED) source.close();
  };
}

function closeOutput() {
  if (state.output) state.output.close();
  state.output = null;
  $("#output-panel").hidden = true;
}

// The feed was refused: signed out (api() shows the box), or the server is down (try again).
async function recheck() {
  try {
    await api("GET", "/auth");
  } catch (error) {
    if (error instanceof Unauthorized) return;
  }
  if (state.running) openFeed();
}

// ---- formatting ----

function setText(selector, text) {
  const element = $(selector);
  if (element && element.textContent !== text) element.textContent = text;
}

function clip(text) {
  return text.length > SHOWN ? `${text.slice(0, SHOWN)}…` : text;
}

function number(n) {
  return n == null ? "–" : Number(n).toLocaleString("en-US");
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function age(seconds) {
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 && seconds % 1 ? 1 : 0)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.floor(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

function ago(time) {
  const seconds = Math.round((Date.now() - Date.parse(time)) / 1000);
  if (Number.isNaN(seconds)) return "–";
  return seconds < 1 ? "just now" : `${age(seconds)} ago`;
}

function clock(time, seconds) {
  const date = new Date(time);
  if (Number.isNaN(date.getTime())) return "";
  return date.toLocaleTimeString("en-GB", seconds ? {} : { hour: "2-digit", minute: "2-digit" });
}

// ---- wiring ----

document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", signIn);
  $("#signout").addEventListener("click", signOut);
  $("#submit-form").addEventListener("submit", submitJob);
  $("#tabs").addEventListener("click", chooseTab);
  $("#queue-select").addEventListener("change", chooseQueue);
  $("#retry-all").addEventListener("click", retryAll);
  $("#more").addEventListener("click", loadMore);
  $("#limits-form").addEventListener("submit", saveLimits);
  $("#limits-close").addEventListener("click", () => { $("#limits-form").hidden = true; });
  $("#schedule-form").addEventListener("submit", addSchedule);
  $("#schedule-kind").addEventListener("change", chooseScheduleKind);
  $("#output-close").addEventListener("click", closeOutput);
  start();
});
