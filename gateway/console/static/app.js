// The Jennah console: one script for every page, rendered in the browser from the
// gateway's Connect JSON API (docs/console.md).
//
// Rule of this file: data never becomes markup. Every value from the API (names, labels,
// commands, output, error messages) reaches the page as a text node or an attribute
// value through el(); nothing here parses markup out of a string.

import { rpc, session } from "./api.js";

const DEV = document.body.dataset.devMode === "1";
const STATUSES = ["pending", "scheduled", "running", "completed", "failed", "cancelled"];
const TASK_STATUSES = ["pending", "running", "succeeded", "failed", "cancelled"];
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const PAGE_SIZE = 25;
const TASKS_PAGE = 100;
const EVENTS_PAGE = 1000;
const MAX_OUTPUT_CHUNKS = 5000; // OUTPUT events kept on the page
const MAX_TIMELINE_ROWS = 2000;
const LIST_EVERY_MS = 2000;
const JOB_EVERY_MS = 1000;
const UNREAD_EVERY_MS = 5000;

const $ = (id) => document.getElementById(id);
const main = $("main");

// --- DOM -----------------------------------------------------------------------------

/** An element; strings among the children become text nodes, `on…` attrs listeners. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null && child !== false) node.append(child);
  }
  return node;
}

function render(title, ...nodes) {
  document.title = title ? `${title} · Jennah` : "Jennah";
  main.replaceChildren(...nodes);
}

/** An internal link; in dev mode it carries the tenant, so it also works in a new tab. */
function link(path, params = {}) {
  const query = new URLSearchParams(params);
  if (DEV && session.tenant() && !session.apiKey()) query.set("tenant", session.tenant());
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

const jobLink = (jobId) => link(`/ui/jobs/${encodeURIComponent(jobId)}`);

function banner(text) {
  const node = $("banner");
  node.textContent = text || "";
  node.hidden = !text;
}

// --- formatting ----------------------------------------------------------------------

/** "JOB_STATUS_RUNNING" → "running" (any enum: the part after the prefix, lower case). */
function short(value, prefix) {
  return (value || "").replace(prefix, "").toLowerCase();
}

const jobStatus = (job) => short(job.status, "JOB_STATUS_");

/** A job's or a task's status as a coloured label. */
function badge(status) {
  const known = STATUSES.includes(status) || TASK_STATUSES.includes(status) ? status : "unknown";
  return el("span", { class: `badge ${known}`, "data-status": known }, status || "unknown");
}

const pad = (n) => String(n).padStart(2, "0");

function when(ts) {
  if (!ts) return "";
  const d = new Date(ts);
  if (Number.isNaN(d.getTime())) return ts;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function seconds(total) {
  if (total < 60) return `${total.toFixed(total < 10 ? 1 : 0)} s`;
  const m = Math.floor(total / 60);
  if (m < 60) return `${m} min ${Math.floor(total % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

function runtime(job) {
  if (!job.startedAt) return "";
  const end = job.completedAt ? new Date(job.completedAt) : new Date();
  return seconds(Math.max(0, (end - new Date(job.startedAt)) / 1000));
}

/** A command as a shell would read it back (display only: nothing runs it). */
function shellWords(args) {
  return (args || []).map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`))
    .join(" ");
}

// --- live updates --------------------------------------------------------------------

// Each rendered page (or sign-in) starts a new generation; loops of an older one stop.
let generation = 0;

/** Run `step` now and every `everyMs` (slower while the tab is hidden) until it returns
 * false, the page changes, or a call is unauthenticated (the sign-in prompt returns). */
function live(step, everyMs) {
  const mine = generation;
  const tick = async () => {
    if (mine !== generation) return;
    let again = true;
    try {
      again = (await step()) !== false;
      banner("");
    } catch (err) {
      if (mine !== generation) return; // the page changed meanwhile (another loop signed out)
      again = handle(err);
    }
    if (again && mine === generation) setTimeout(tick, document.hidden ? everyMs * 5 : everyMs);
  };
  tick();
}

/** What to do with a failed call: unauthenticated brings the sign-in prompt back (false);
 * anything else shows in the banner, and polling goes on (true). */
function handle(err, after = "Retrying…") {
  if (err.code === "unauthenticated") {
    session.save({ apiKey: "" });
    signInPage("Your credentials were not accepted (an API key may have been revoked). " +
      `Sign in again. (${err.message})`);
    return false;
  }
  banner(`The gateway answered ${err.code}: ${err.message}. ${after}`);
  return true;
}

/** Run a user action (a click); its failure shows in the banner, or signs out. */
async function act(action) {
  try {
    await action();
  } catch (err) {
    handle(err, "");
  }
}

/** Keep at most `max` children in `parent`, dropping the oldest (a job may print more
 * than a page should hold); `note` shows once some were dropped. */
function cap(parent, max, note) {
  while (parent.childElementCount > max) {
    parent.firstElementChild.remove();
    note.hidden = false;
  }
}

// --- sign-in -------------------------------------------------------------------------

async function signIn() {
  let me;
  try {
    me = await rpc("GetCurrentTenant");
  } catch (err) {
    if (err.code === "unauthenticated" || err.code === "invalid_argument") {
      signInPage(session.apiKey() || session.tenant() ? err.message : "");
    } else {
      generation++;
      render("Unavailable", el("section", { class: "notice" },
        el("h1", {}, "The gateway cannot answer"),
        el("p", {}, `${err.code}: ${err.message}`),
        el("button", { type: "button", onclick: () => signIn() }, "Try again")));
    }
    return;
  }
  $("identity").textContent = `${me.tenantId} (${me.authMethod})`;
  $("signout").hidden = !(session.apiKey() || session.tenant());
  $("nav").hidden = false;
  $("who").hidden = false;
  for (const a of document.querySelectorAll(".top a")) a.href = link(new URL(a.href).pathname);
  generation++;
  banner("");
  route();
  watchUnread();
}

function signInPage(message) {
  generation++;
  $("nav").hidden = true;
  $("who").hidden = true;
  banner("");
  const key = el("input", {
    id: "api-key", name: "api-key", type: "password", autocomplete: "off",
    placeholder: "jk_…", spellcheck: "false",
  });
  const tenant = DEV
    ? el("input", { id: "tenant", name: "tenant", value: session.tenant(), placeholder: "acme" })
    : null;
  const form = el("form", { id: "signin", class: "card narrow", onsubmit: (e) => {
    e.preventDefault();
    session.save({ apiKey: key.value.trim(), tenant: tenant ? tenant.value.trim() : undefined });
    signIn();
  } },
  el("h1", {}, "Sign in"),
  message ? el("p", { id: "signin-message", class: "error", role: "alert" }, message) : null,
  tenant ? [
    el("label", { for: "tenant" }, "Tenant (dev mode)"), tenant,
    el("p", { class: "hint" }, "Dev mode trusts this tenant id (sent as X-Tenant-Id); ",
      "no key needed. ", el("code", {}, "/ui/?tenant=acme"), " does the same."),
  ] : null,
  el("label", { for: "api-key" }, tenant ? "API key (optional in dev mode)" : "API key"),
  key,
  el("p", { class: "hint" }, "From ", el("code", {}, "jennah keys create --tenant <tenant>"),
    ". Kept in this browser tab only, until it closes."),
  el("button", { type: "submit", class: "primary" }, "Sign in"));
  render("Sign in", form);
  (tenant || key).focus();
}

function signOut() {
  session.forget();
  signInPage("");
}

function watchUnread() {
  const count = $("unread");
  live(async () => {
    try {
      const resp = await rpc("ListNotifications", { limit: 1 });
      const n = resp.unreadCount || 0;
      count.textContent = String(n);
      count.title = `${n} unread`;
      count.hidden = n === 0;
    } catch (err) {
      if (err.code === "unauthenticated") throw err;
      count.hidden = true; // notifications unavailable: the rest of the console still works
    }
  }, UNREAD_EVERY_MS);
}

// --- pages ---------------------------------------------------------------------------

function route() {
  const path = location.pathname;
  if (path === "/ui/") return jobsPage();
  if (path === "/ui/submit") return submitPage();
  if (path === "/ui/notifications") return notificationsPage();
  const match = path.match(/^\/ui\/jobs\/([^/]+)$/);
  if (match) {
    let jobId = null;
    try {
      jobId = decodeURIComponent(match[1]);
    } catch {
      jobId = null;
    }
    if (jobId !== null) return jobPage(jobId);
  }
  return notFound("Page not found", "There is no such page in the console.");
}

function notFound(title, ...text) {
  generation++; // stops the page's loops; the unread count stops too, which is fine here
  render(title, el("section", { class: "notice", id: "not-found" },
    el("h1", {}, title), el("p", {}, ...text),
    el("a", { href: link("/ui/") }, "← All jobs")));
}

function jobsPage() {
  const params = new URLSearchParams(location.search);
  const first = params.get("status") || "";
  const state = {
    status: "", labels: {}, prefix: "", invalid: "", tokens: [""], page: 0, asked: 0,
  };
  const filter = el("select", { id: "status-filter", "aria-label": "Status" },
    el("option", { value: "" }, "All statuses"),
    STATUSES.map((s) => el("option", { value: s }, s)));
  filter.value = STATUSES.includes(first) ? first : "";
  const labels = el("input", {
    id: "label-filter", name: "label", "aria-label": "Labels", class: "filter",
    placeholder: "Labels: team=ml env=prod", value: params.getAll("label").join(" "),
    autocomplete: "off", spellcheck: "false",
  });
  const prefix = el("input", {
    id: "name-filter", name: "prefix", "aria-label": "Name prefix", class: "filter",
    placeholder: "Name starts with…", value: params.get("prefix") || "", autocomplete: "off",
    spellcheck: "false",
  });
  const problem = el("p", { id: "filter-error", class: "error", role: "alert", hidden: true });
  const rows = el("tbody");
  const empty = el("p", { class: "empty", id: "empty", hidden: true });
  const newer = el("button", { type: "button", id: "newer" }, "← Newer");
  const older = el("button", { type: "button", id: "older" }, "Older →");
  const where = el("span", { class: "muted", id: "page" });

  /** A filter that cannot be searched (`message`; "" for none): it is shown, and no call
   * is made (not even the periodic one) until it is changed, since a list filtered by
   * part of what the user typed would look like an answer. */
  function refuse(message) {
    state.invalid = message;
    problem.textContent = message;
    problem.hidden = !message;
  }

  /** The controls into the state, back to page 1. */
  function apply() {
    let parsed = {};
    let invalid = "";
    try {
      parsed = labelFilter(labels.value);
    } catch (err) {
      invalid = err.message;
    }
    Object.assign(state, { status: filter.value, labels: parsed, prefix: prefix.value.trim(),
      tokens: [""], page: 0 });
    refuse(invalid);
    if (!invalid) history.replaceState(null, "", link("/ui/", listQuery(state)));
  }

  async function refresh() {
    const asked = ++state.asked;
    if (!state.invalid) {
      try {
        const resp = await rpc("ListJobs", listRequest(state));
        if (asked === state.asked) show(resp); // else a newer request (filter, paging) is out
        return;
      } catch (err) {
        if (err.code !== "invalid_argument") throw err;
        if (asked !== state.asked) return;
        // Only the typed filter can be invalid (the rest is the page's own making).
        refuse(`The gateway refused the filter: ${err.message}.`);
      }
    }
    rows.replaceChildren();
    empty.hidden = true;
    newer.disabled = older.disabled = true;
    where.textContent = "";
  }

  function show(resp) {
    const jobs = resp.jobs || [];
    state.tokens.length = state.page + 1;
    if (resp.nextPageToken) state.tokens.push(resp.nextPageToken);
    rows.replaceChildren(...jobs.map(jobRow));
    empty.hidden = jobs.length > 0;
    empty.replaceChildren(...emptyList(state));
    newer.disabled = state.page === 0;
    older.disabled = state.tokens.length <= state.page + 1;
    where.textContent = `Page ${state.page + 1}`;
  }

  const again = () => act(refresh);
  const filters = el("form", { id: "filters", class: "filters", onsubmit: (e) => {
    e.preventDefault();
    apply();
    again();
  } }, filter, labels, prefix, el("button", { type: "submit", id: "apply-filters" }, "Filter"));
  filter.addEventListener("change", () => { apply(); again(); });
  newer.addEventListener("click", () => { state.page = Math.max(0, state.page - 1); again(); });
  older.addEventListener("click", () => { state.page += 1; again(); });

  apply();
  render("Jobs", el("section", {},
    el("div", { class: "toolbar" }, el("h1", {}, "Jobs"), filters,
      el("a", { class: "button primary", href: link("/ui/submit") }, "Submit a job")),
    problem,
    el("table", { class: "jobs", id: "jobs" },
      el("thead", {}, el("tr", {}, ["Job", "Status", "Tasks", "Image", "Created", "Run time"]
        .map((h) => el("th", {}, h)))),
      rows),
    empty,
    el("div", { class: "pager" }, newer, where, older)));
  live(refresh, LIST_EVERY_MS);
}

/** The list's label filter as typed: `key=value` terms, separated by spaces or commas (neither
 * can be in a label). A term without a key and "=" throws, naming it; so does a key given
 * twice, which no job could match (a job has one value per key). */
function labelFilter(text) {
  const labels = new Map();
  for (const term of text.split(/[\s,]+/).filter(Boolean)) {
    const at = term.indexOf("=");
    if (at < 1) {
      throw new Error(`Label filter "${term}" is not key=value (for example team=ml). ` +
        "Nothing was searched.");
    }
    const key = term.slice(0, at);
    if (labels.has(key)) {
      throw new Error(`Label filter: "${key}" is given twice; a job has one value per label.`);
    }
    labels.set(key, term.slice(at + 1));
  }
  return Object.fromEntries(labels);
}

function listRequest(state) {
  const request = { page_size: PAGE_SIZE, page_token: state.tokens[state.page] };
  if (state.status) request.status = `JOB_STATUS_${state.status.toUpperCase()}`;
  if (Object.keys(state.labels).length) request.labels = state.labels;
  if (state.prefix) request.name_prefix = state.prefix;
  return request;
}

/** The list's URL query: what a reload (or a shared link) needs to show the same list. */
function listQuery(state) {
  const query = [];
  if (state.status) query.push(["status", state.status]);
  for (const [key, value] of Object.entries(state.labels)) query.push(["label", `${key}=${value}`]);
  if (state.prefix) query.push(["prefix", state.prefix]);
  return query;
}

function emptyList(state) {
  const what = state.status ? `${state.status} jobs` : "jobs";
  if (Object.keys(state.labels).length || state.prefix) return [`No ${what} match the filters.`];
  if (state.status) return [`No ${what}.`];
  return ["No jobs yet. ", el("a", { href: link("/ui/submit") }, "Submit one.")];
}

function jobRow(job) {
  return el("tr", { "data-job-id": job.jobId },
    el("td", {},
      el("a", { href: jobLink(job.jobId), class: "name" }, job.name || job.jobId),
      job.name ? el("div", { class: "mono muted small" }, job.jobId) : null),
    el("td", {}, badge(jobStatus(job))),
    taskCell(job),
    el("td", { class: "mono" }, job.imageUri || ""),
    el("td", {}, when(job.createdAt)),
    el("td", {}, runtime(job)));
}

/** The list's Tasks cell: "1" for a job of one task; for more, "succeeded/total ✓" and
 * beneath it the other states that have any (failed first: it is what one looks for). */
function taskCell(job) {
  const total = job.taskCount || 1;
  if (total === 1) return el("td", { class: "num muted" }, "1");
  const counts = job.taskCounts || {};
  const others = ["failed", "running", "pending", "cancelled"].filter((n) => counts[n]);
  return el("td", { class: "num tasks-cell", title: TASK_STATUSES
    .map((n) => `${counts[n] || 0} ${n}`).join(", ") + ` of ${total}` },
  el("span", { class: "done" }, `${counts.succeeded || 0}/${total} ✓`),
  others.length ? el("div", { class: "small" }, others.flatMap((n, i) => [
    i ? " · " : "", el("span", { class: `count-${n}` }, `${counts[n]} ${n}`)])) : null);
}

function jobPage(jobId) {
  const state = { afterSeq: 0, job: null, shown: false, task: null };
  const title = el("h1", { id: "job-title" });
  const status = el("span", { id: "job-status" });
  const liveMark = el("span", { id: "live", class: "live" });
  const cancel = el("button", { type: "button", id: "cancel" }, "Cancel");
  const remove = el("button", { type: "button", id: "delete", class: "danger" }, "Delete");
  const fields = el("dl", { id: "fields", class: "fields" });
  const times = el("dl", { id: "timestamps", class: "fields" });
  const tasks = el("div", { id: "task-counts", class: "tasks" });
  const timeline = el("tbody", { id: "timeline" });
  const trimmed = el("p", { class: "muted", hidden: true },
    "Older output and events are not shown here: ListJobEvents has them all.");

  /** Show only task `index`'s output (null: every task's), and mark its row. */
  function pick(index) {
    state.task = index;
    output.only(index);
    table.draw();
    if (index !== null) $("output-card").scrollIntoView({ block: "start" });
  }
  const output = outputView(trimmed, pick);
  const table = tasksTable(jobId, pick, () => state.task);

  cancel.addEventListener("click", () => act(async () => {
    if (!confirm(`Cancel job ${state.job.name || jobId}?`)) return;
    const resp = await rpc("CancelJob", { job_id: jobId });
    show(resp.job);
  }));
  remove.addEventListener("click", () => act(async () => {
    if (!confirm(`Delete job ${state.job.name || jobId}? Its record and events go too.`)) return;
    await rpc("DeleteJob", { job_id: jobId });
    location.assign(link("/ui/"));
  }));

  function show(job) {
    state.job = job;
    const s = jobStatus(job);
    title.textContent = job.name || job.jobId;
    document.title = `${job.name || job.jobId} · Jennah`;
    status.replaceChildren(badge(s));
    cancel.disabled = TERMINAL.has(s) || Boolean(job.cancelRequested);
    cancel.textContent = job.cancelRequested && !TERMINAL.has(s) ? "Cancelling…" : "Cancel";
    fields.replaceChildren(...definitions(jobFields(job)));
    times.replaceChildren(...definitions([
      ["Created", when(job.createdAt)], ["Scheduled", when(job.scheduledAt)],
      ["Started", when(job.startedAt)], ["Completed", when(job.completedAt)],
      ["Updated", when(job.updatedAt)], ["Run time", runtime(job)],
    ]));
    tasks.replaceChildren(...taskCounts(job));
  }

  function add(event) {
    const kind = short(event.kind, "EVENT_KIND_");
    if (kind === "output") {
      output.add(event, (state.job.taskCount || 1) > 1);
      return;
    }
    timeline.append(el("tr", { "data-kind": kind },
      el("td", { class: "num" }, event.seq),
      el("td", {}, when(event.createdAt)),
      el("td", {}, kind),
      el("td", {}, short(event.status, "JOB_STATUS_")),
      el("td", {}, taskDetail(event)),
      el("td", { class: "mono muted" }, event.workerId || "")));
    cap(timeline, MAX_TIMELINE_ROWS, trimmed);
  }

  async function refresh() {
    let job;
    try {
      job = (await rpc("GetJob", { job_id: jobId })).job;
    } catch (err) {
      if (err.code !== "not_found") throw err;
      notFound("Job not found", "There is no job ", el("code", {}, jobId), " for this tenant.");
      return false;
    }
    if (!state.shown) {
      state.shown = true;
      render(job.name || job.jobId, layout);
    }
    show(job);
    // Events (and tasks) after the job: a terminal job's last event (committed with its
    // transition, as are its tasks' final states) is then among them, so nothing is
    // missed when the loop stops.
    for (;;) {
      const resp = await rpc("ListJobEvents",
        { job_id: jobId, after_seq: state.afterSeq, page_size: EVENTS_PAGE });
      const events = resp.events || [];
      for (const event of events) {
        state.afterSeq = Math.max(state.afterSeq, Number(event.seq));
        add(event);
      }
      if (events.length < EVENTS_PAGE) break;
    }
    await table.refresh(job);
    const ended = TERMINAL.has(jobStatus(job));
    liveMark.textContent = ended ? "ended" : "live"; // "ended": every last read is shown
    liveMark.classList.toggle("on", !ended);
    output.end(ended);
    return !ended;
  }

  const layout = el("section", { class: "job" },
    el("p", {}, el("a", { href: link("/ui/") }, "← All jobs")),
    el("div", { class: "toolbar" }, title, status, liveMark, el("span", { class: "grow" }),
      cancel, remove),
    el("div", { class: "columns" },
      el("div", { class: "card" }, el("h2", {}, "Job"), fields),
      el("div", {},
        el("div", { class: "card" }, el("h2", {}, "Tasks"), tasks),
        el("div", { class: "card" }, el("h2", {}, "Timestamps"), times))),
    table.node,
    el("div", { class: "card", id: "output-card" }, el("h2", {}, "Output"), output.nodes,
      trimmed),
    el("div", { class: "card" }, el("h2", {}, "Events"),
      el("table", { class: "events" },
        el("thead", {}, el("tr", {}, ["Seq", "Time", "Event", "Status", "Detail", "Worker"]
          .map((h) => el("th", {}, h)))),
        timeline)));
  render("Job", el("p", { class: "muted" }, "Loading…"));
  live(refresh, JOB_EVERY_MS);
}

/** An event's detail, naming its task if it has one and does not say so already. */
function taskDetail(event) {
  const message = event.message || "";
  if (event.taskIndex === undefined) return message;
  const task = `task ${event.taskIndex}`;
  return message.startsWith(`${task} `) ? message : `${task}: ${message}`;
}

/** A job's output as it arrives: stderr in red, and in a job of several tasks each line
 * after `[task N]`. `only(index)` shows one task's chunks (each OUTPUT event is one
 * task's), `only(null)` all again; the bar above says which, with the way back. */
function outputView(trimmed, pick) {
  const state = { task: null, ended: false };
  const pre = el("pre", { id: "output", class: "output", hidden: true });
  const none = el("p", { class: "muted", id: "no-output" });
  const which = el("strong");
  const bar = el("p", { id: "output-filter", class: "filterbar", hidden: true },
    "Only the output of task ", which, ". ",
    el("button", { type: "button", id: "output-all", class: "small", onclick: () => pick(null) },
      "Show every task"));
  const shown = (chunk) => state.task === null || chunk.dataset.task === String(state.task);

  /** The "no output" line and the output box, for what the filter leaves to see. */
  function update() {
    const any = [...pre.children].some(shown);
    const whose = state.task === null ? "" : ` from task ${state.task}`;
    none.textContent = `No output${whose}${state.ended ? "" : " yet"}.`;
    none.hidden = any;
    pre.hidden = !any;
  }

  function add(event, array) {
    const index = event.taskIndex;
    const raw = event.output || "";
    const text = index !== undefined && array ? raw.replace(/^(?=.)/gm, `[task ${index}] `) : raw;
    const near = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
    const chunk = el("span", { class: event.message === "stderr" ? "stderr" : null,
      "data-task": index }, text);
    chunk.hidden = !shown(chunk);
    pre.append(chunk);
    cap(pre, MAX_OUTPUT_CHUNKS, trimmed);
    if (!chunk.hidden) {
      none.hidden = true;
      pre.hidden = false;
    }
    if (near) pre.scrollTop = pre.scrollHeight;
  }

  function only(index) {
    state.task = index;
    for (const chunk of pre.children) chunk.hidden = !shown(chunk);
    which.textContent = String(index);
    bar.hidden = index === null;
    update();
    pre.scrollTop = pre.scrollHeight;
  }

  function end(ended) {
    state.ended = ended;
    update();
  }

  update();
  return { nodes: [bar, none, pre], add, only, end };
}

/** The tasks of a job of several (ListTasks), in a card of their own: a status filter,
 * pages of TASKS_PAGE by the page token, and a click on a task's index to see only its
 * output (`pick`; `picked()` is the task shown, whose row is marked). The page is read
 * again only when the job changed since (every task change moves its `updated_at`) or
 * the filter or page did; otherwise it is only drawn again, so run times keep going. */
function tasksTable(jobId, pick, picked) {
  const state = { job: null, status: "", tokens: [""], page: 0, asked: 0, read: "", tasks: [] };
  const filter = el("select", { id: "task-filter", "aria-label": "Task status" },
    el("option", { value: "" }, "All tasks"),
    TASK_STATUSES.map((s) => el("option", { value: s }, s)));
  const rows = el("tbody", { id: "task-rows" });
  const empty = el("p", { class: "empty", id: "tasks-empty", hidden: true });
  const previous = el("button", { type: "button", id: "tasks-previous" }, "← Previous");
  const next = el("button", { type: "button", id: "tasks-next" }, "Next →");
  const where = el("span", { class: "muted", id: "tasks-page" });
  const node = el("div", { class: "card", id: "tasks-card", hidden: true },
    el("div", { class: "cardbar" }, el("h2", {}, "Task list"), el("span", { class: "grow" }),
      filter),
    el("table", { class: "tasks-table", id: "tasks" },
      el("thead", {}, el("tr", {}, ["Task", "Status", "Exit code", "Retries", "Started", "Ended",
        "Run time", "Error"].map((h) => el("th", {}, h)))),
      rows),
    empty,
    el("div", { class: "pager" }, previous, where, next));

  async function refresh(job) {
    state.job = job;
    node.hidden = (job.taskCount || 1) <= 1;
    if (node.hidden) return;
    const read = [job.updatedAt, state.status, state.page].join("|");
    if (read !== state.read) {
      const asked = ++state.asked;
      const request = {
        job_id: jobId, page_size: TASKS_PAGE, page_token: state.tokens[state.page],
      };
      if (state.status) request.status = `TASK_STATUS_${state.status.toUpperCase()}`;
      const resp = await rpc("ListTasks", request);
      if (asked !== state.asked) return; // a newer read (filter, paging) is on its way
      state.read = read;
      state.tasks = resp.tasks || [];
      state.tokens.length = state.page + 1;
      if (resp.nextPageToken) state.tokens.push(resp.nextPageToken);
    }
    draw();
  }

  function draw() {
    if (!state.job) return;
    rows.replaceChildren(...state.tasks.map((t) => taskRow(t, pick, picked())));
    empty.textContent = state.status ? `No ${state.status} tasks.` : "No tasks.";
    empty.hidden = state.tasks.length > 0;
    const counts = state.job.taskCounts || {};
    const total = state.status ? counts[state.status] || 0 : state.job.taskCount || 1;
    const pages = Math.max(1, Math.ceil(total / TASKS_PAGE));
    where.textContent = `${total} ${state.status || "tasks"} · page ${state.page + 1} of ` +
      `${Math.max(pages, state.page + 1)}`;
    previous.disabled = state.page === 0;
    next.disabled = state.tokens.length <= state.page + 1;
  }

  const again = () => act(() => refresh(state.job));
  filter.addEventListener("change", () => {
    Object.assign(state, { status: filter.value, tokens: [""], page: 0 });
    again();
  });
  previous.addEventListener("click", () => { state.page = Math.max(0, state.page - 1); again(); });
  next.addEventListener("click", () => { state.page += 1; again(); });
  return { node, refresh, draw };
}

function taskRow(task, pick, picked) {
  const index = task.index || 0; // JSON leaves out a zero
  const s = short(task.status, "TASK_STATUS_");
  const failure = short(task.failureClass, "FAILURE_CLASS_");
  // A task that ended without an end time (cancelled before it ran) has no run time.
  const ran = task.completedAt || s === "running" ? runtime(task) : "";
  return el("tr", { "data-task-index": index, class: picked === index ? "picked" : null },
    el("td", { class: "num" }, el("button", {
      type: "button", class: "task-link", title: `Show only task ${index}'s output`,
      "aria-pressed": String(picked === index), onclick: () => pick(index),
    }, String(index))),
    el("td", {}, badge(s)),
    el("td", { class: "num exit" }, task.exitCode !== undefined ? String(task.exitCode) : ""),
    el("td", { class: "num" }, String(task.attempt || 0)),
    el("td", {}, when(task.startedAt)),
    el("td", {}, when(task.completedAt)),
    el("td", {}, ran),
    el("td", { class: "error" }, task.errorMessage || "", failure ? ` (${failure})` : ""));
}

function jobFields(job) {
  const r = job.resourceOverride || {};
  const accel = job.accelerator;
  const labels = Object.entries(job.labels || {});
  return [
    ["Job ID", el("span", { class: "mono" }, job.jobId)],
    ["Tenant", job.tenantId],
    ["Image", el("span", { class: "mono" }, job.imageUri || "")],
    ["Command", job.commands?.length ? el("code", {}, shellWords(job.commands)) : ""],
    ["Env vars", (job.envVarNames || []).join(", ")],
    ["Labels", labels.length
      ? labels.map(([k, v]) => el("span", { class: "chip" }, `${k}=${v}`)) : ""],
    ["Profile", job.resourceProfile || "small"],
    ["CPU", r.cpuMillis ? `${r.cpuMillis} millicpu` : ""],
    ["Memory", r.memoryMib ? `${r.memoryMib} MiB` : ""],
    ["Timeout", r.maxRunDurationSeconds ? seconds(Number(r.maxRunDurationSeconds)) : ""],
    ["Machine", job.machineType || ""],
    ["Spot VMs", job.useSpotVms ? "yes" : ""],
    ["Accelerator", accel && (accel.type || accel.count)
      ? `${accel.count || 1} × ${accel.type || "GPU"}` : ""],
    ["Tasks", `${job.taskCount || 1}` + (job.parallelism ? `, ${job.parallelism} at a time` : "")],
    ["Retries", `${job.retryCount || 0} of at most ${job.maxRetries || 0}`],
    ["Exit code", job.exitCode !== undefined ? String(job.exitCode) : ""],
    ["Failure", short(job.failureClass, "FAILURE_CLASS_")],
    ["Error", job.errorMessage ? el("span", { class: "error", id: "job-error" }, job.errorMessage)
      : ""],
    ["Provider", job.provider || ""],
    ["Resource", el("span", { class: "mono" }, job.cloudResourcePath || "")],
    ["Worker", job.ownerWorkerId || ""],
    ["Request ID", el("span", { class: "mono" }, job.requestId || "")],
  ];
}

/** dt/dd pairs, leaving out empty values. */
function definitions(pairs) {
  return pairs.filter(([, v]) => v !== "" && (!(v instanceof Node) || v.textContent !== "") &&
    !(Array.isArray(v) && !v.length))
    .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]);
}

function taskCounts(job) {
  const total = job.taskCount || 1;
  const counts = job.taskCounts || {};
  const bar = el("div", { class: "bar", title: `${total} tasks` },
    TASK_STATUSES.filter((n) => counts[n]).map((n) => {
      const segment = el("span", { class: `seg ${n}` });
      segment.style.flexGrow = String(counts[n]); // CSSOM: the policy forbids style attributes
      return segment;
    }));
  return [
    el("p", { class: "total" }, `${total} task${total === 1 ? "" : "s"}`),
    bar,
    el("ul", { class: "counts" }, TASK_STATUSES.map((n) => el("li", { "data-count": n },
      el("span", { class: `dot ${n}` }), `${n} `, el("strong", {}, String(counts[n] || 0))))),
  ];
}

function submitPage() {
  let requestId = newRequestId();
  const field = (id, label, input, hint) => el("div", { class: "field" },
    el("label", { for: id }, label), input, hint ? el("p", { class: "hint" }, hint) : null);
  const input = (id, attrs = {}) => el("input", { id, name: id, ...attrs });
  const area = (id, attrs = {}) => el("textarea", { id, name: id, rows: 4, ...attrs });
  const profile = el("select", { id: "f-profile", name: "f-profile" },
    el("option", { value: "" }, "default (small)"),
    ["small", "medium", "large", "xlarge"].map((p) => el("option", { value: p }, p)));
  const error = el("p", { id: "submit-error", class: "error", role: "alert", hidden: true });
  const button = el("button", { type: "submit", class: "primary" }, "Submit job");

  const form = el("form", { id: "submit-form", class: "card form" },
    el("h1", {}, "Submit a job"),
    el("div", { class: "grid" },
      field("f-name", "Name", input("f-name", { placeholder: "nightly-report" })),
      field("f-image", "Image", input("f-image", { required: true, placeholder: "busybox" }))),
    field("f-commands", "Command", area("f-commands", { placeholder: "sh\n-c\necho hello" }),
      "One argument per line (empty lines are skipped)."),
    el("div", { class: "grid" },
      field("f-env", "Environment", area("f-env", { placeholder: "NAME=value" }),
        "NAME=value per line. Values are write-only: they are never shown again."),
      field("f-labels", "Labels", area("f-labels", { placeholder: "team=ml" }),
        "key=value per line.")),
    el("fieldset", {}, el("legend", {}, "Tasks"),
      el("div", { class: "grid" },
        field("f-task-count", "Task count",
          input("f-task-count", { type: "number", min: 1, max: 10000, value: 1 }),
          "Each task sees JENNAH_TASK_INDEX and JENNAH_TASK_COUNT."),
        field("f-parallelism", "Parallelism",
          input("f-parallelism", { type: "number", min: 0, value: 0 }),
          "At most this many at a time (0: no limit)."))),
    el("fieldset", {}, el("legend", {}, "Resources"),
      el("div", { class: "grid four" },
        field("f-profile", "Profile", profile),
        field("f-cpu", "CPU (millicpu)", input("f-cpu", { type: "number", min: 0 })),
        field("f-memory", "Memory (MiB)", input("f-memory", { type: "number", min: 0 })),
        field("f-timeout", "Timeout (s)", input("f-timeout", { type: "number", min: 0 }))),
      field("f-retries", "Max retries", input("f-retries", { type: "number", min: 0, value: 0 }),
        "For preemption and infrastructure failures only.")),
    error,
    el("div", { class: "actions" }, button));

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    error.hidden = true;
    let request;
    try {
      request = submitRequest(requestId);
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
      return;
    }
    button.disabled = true;
    try {
      const resp = await rpc("SubmitJob", request);
      requestId = newRequestId();
      location.assign(jobLink(resp.jobId));
    } catch (err) {
      if (err.code === "unauthenticated") {
        handle(err);
        return;
      }
      // The same request id on a retry: a job the lost answer created is not made twice.
      error.textContent = `${err.code}: ${err.message}`;
      error.hidden = false;
    } finally {
      button.disabled = false;
    }
  });
  render("Submit", form);
}

/** 128 random bits as hex (crypto.randomUUID needs a secure context; this does not). */
function newRequestId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `ui-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function lines(id) {
  return $(id).value.split("\n").map((l) => l.replace(/\r$/, "")).filter((l) => l.trim());
}

/** "k=v" lines → an object; a line without "=" is refused with its number. */
function pairs(id, what) {
  const out = {};
  lines(id).forEach((line, i) => {
    const at = line.indexOf("=");
    if (at < 1) throw new Error(`${what}, line ${i + 1}: expected NAME=value`);
    out[line.slice(0, at).trim()] = line.slice(at + 1);
  });
  return out;
}

function number(id) {
  const raw = $(id).value.trim();
  return raw ? Number(raw) : 0;
}

function submitRequest(requestId) {
  const request = {
    request_id: requestId,
    name: $("f-name").value.trim(),
    image_uri: $("f-image").value.trim(),
    commands: lines("f-commands"),
    env_vars: pairs("f-env", "Environment"),
    labels: pairs("f-labels", "Labels"),
    task_count: number("f-task-count"),
    parallelism: number("f-parallelism"),
    resource_profile: $("f-profile").value,
    max_retries: number("f-retries"),
  };
  const override = {
    cpu_millis: number("f-cpu"), memory_mib: number("f-memory"),
    max_run_duration_seconds: number("f-timeout"),
  };
  if (Object.values(override).some((v) => v)) request.resource_override = override;
  return request;
}

function notificationsPage() {
  const state = { unreadOnly: false };
  const list = el("ul", { id: "notifications", class: "notes" });
  const summary = el("p", { id: "notes-summary", class: "muted" });
  const problem = el("p", { id: "notes-error", class: "error", hidden: true });
  const only = el("input", { type: "checkbox", id: "unread-only" });

  async function refresh() {
    let resp;
    try {
      resp = await rpc("ListNotifications", { limit: 100, unread_only: state.unreadOnly });
    } catch (err) {
      if (err.code === "unauthenticated") throw err;
      problem.textContent = `Notifications are unavailable: ${err.code}: ${err.message}`;
      problem.hidden = false;
      return;
    }
    problem.hidden = true;
    const notes = resp.notifications || [];
    const unread = resp.unreadCount || 0;
    summary.textContent = `${unread} unread`;
    const count = $("unread");
    count.textContent = String(unread);
    count.hidden = unread === 0;
    list.replaceChildren(...notes.map(noteItem));
    if (!notes.length) list.append(el("li", { class: "empty" }, "No notifications."));
  }

  function noteItem(note) {
    const read = Boolean(note.isRead);
    const ack = read ? null : el("button", { type: "button", class: "small" }, "Mark read");
    ack?.addEventListener("click", () => act(async () => {
      await rpc("AckNotification", { notification_id: note.id });
      await refresh();
    }));
    return el("li", { class: read ? "read" : "unread", "data-notification-id": note.id },
      badge(short(note.finalStatus, "JOB_STATUS_")),
      el("a", { href: jobLink(note.jobId), class: "name" }, note.jobName || note.jobId),
      el("span", { class: "muted" }, when(note.occurredAt)),
      note.errorMessage ? el("span", { class: "error" }, note.errorMessage) : null,
      el("span", { class: "grow" }),
      ack);
  }

  only.addEventListener("change", () => { state.unreadOnly = only.checked; act(refresh); });
  render("Notifications", el("section", {},
    el("div", { class: "toolbar" }, el("h1", {}, "Notifications"), summary,
      el("label", { class: "check" }, only, " Unread only")),
    problem, list));
  live(refresh, UNREAD_EVERY_MS);
}

// --- start ---------------------------------------------------------------------------

const params = new URLSearchParams(location.search);
if (params.has("tenant")) session.save({ tenant: params.get("tenant").trim() });
$("signout").addEventListener("click", signOut);
signIn();
