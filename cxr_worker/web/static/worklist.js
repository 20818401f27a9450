// The cxr-worker web worklist: sign-in, the reading queue in bands, one study with its
// heatmaps, live updates (server-sent events), keyboard navigation, the admin view.
//
// Everything shown comes from the REST API under /api/v1 (cxr_worker/web/api.py). Text that
// a sender supplied (accession numbers, reasons, names) is only ever put into the page as
// text (textContent, text nodes): this file never writes HTML. The Content-Security-Policy
// allows this file and the stylesheet only: no inline script, no inline style attribute
// (widths are set through the CSSOM, which the policy allows).

const API = "/api/v1";
const PAGE = 50;            // rows per "load more"
const MAX_LIMIT = 500;      // the API's largest page
const THUMB = 128;          // row thumbnails (pixels, longest side)
const FULL = 768;           // images in the study view
const SUSPECTED = "SUSPECTED PNEUMONIA";
const NEGATIVE = "NO PNEUMONIA DETECTED";
const CSRF_HEADER = document.body.dataset.csrfHeader || "X-CSRF-Token";
const MODE = document.body.dataset.mode || "serve";

const BAND_TITLES = {
  "suspected": "Suspected pneumonia",
  "outside-suspected": "Suspected pneumonia, outside the validated population",
  "routine": "No pneumonia detected",
  "outside-negative": "No pneumonia detected, outside the validated population",
  "not_scored": "Not scored",
  "pending": "Pending: being scored",
  "failed": "Failed: could not be processed",
};
const DELIVERY = {
  // a study's status -> what happened to its results on the way to the PACS (and the RIS)
  "sent": ["Sent", "ok"],
  "retrying": ["Sending: retrying", "warn"],
  "undelivered": ["Undelivered: sending failed", "bad"],
  "held": ["Held: not sent", "warn"],
  "pending": ["No result yet", "none"],
  "not_scored": ["No result", "none"],
  "failed": ["No result: processing failed", "bad"],
};
const INSTANCE_DELIVERY = {
  "sent": "Sent", "retrying": "Sending: retrying", "undelivered": "Undelivered: sending failed",
  "failed": "Undelivered: sending failed", "held": "Held: not sent",
  "waiting": "Queued to send (or sending paused)",
};
const KIND = {
  "sc": ["SC", "Secondary Capture to the PACS"],
  "sr": ["SR", "Structured Report to the PACS"],
  "kos": ["KOS", "Rejection note to the PACS"],
  "hl7": ["HL7", "HL7 result to the RIS"],
};
const KIND_STATUS = {
  "pending": "queued", "retrying": "retrying", "sent": "sent", "failed": "failed",
  "held": "held", "cancelled": "cancelled",
};
const POPULATION = {
  "in_population": "In the validated population",
  "outside": "Outside the validated population",
  "unknown": "Population unknown (not validated)",
};

const state = {
  me: null,
  csrf: null,
  view: null,
  filters: { status: "", since: "", accession: "", read: "unread" },
  rows: [],
  next: null,
  version: null,
  skew: 0,            // server clock - this clock, in ms (waiting times use the server's)
  selected: null,     // the selected study's UID (kept across updates)
  selectedIndex: 0,
  openUid: null,
  openSig: null,
  heatOn: new Map(),  // SOP Instance UID -> heatmap shown in the study view
  listSeq: 0,
  refreshing: null,
  refreshAgain: false,
  source: null,
  live: false,
  deadNext: null,
  adminTimer: null,
};
const rowEls = new Map(); // study UID -> {el, sig, img, imgKey}

// -- small helpers ----------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function setText(id, text) { $(id).textContent = text || ""; }

function show(id, visible) { $(id).hidden = !visible; }

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.csrf) headers[CSRF_HEADER] = state.csrf;
  let r;
  try {
    r = await fetch(API + path, {
      method, headers, credentials: "same-origin", cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (exc) {
    throw new HttpError(0, "The worker does not answer (network error).");
  }
  let data = null;
  try { data = await r.json(); } catch (exc) { data = null; }
  if (!r.ok) {
    const err = new HttpError(r.status, (data && data.error) || `HTTP ${r.status}`);
    if (r.status === 401 && state.me && path !== "/session") {
      signedOut("Your session ended (expired, signed out or the token was revoked): sign in again.");
    }
    throw err;
  }
  return data;
}

function enc(uid) { return encodeURIComponent(uid); }

let toastTimer = null;
function toast(message) {
  const t = $("toast");
  t.textContent = message;
  t.classList.add("shown");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.classList.remove("shown"); t.textContent = ""; }, 6000);
}

// -- numbers and times --------------------------------------------------------------------------
function formatProbability(p) {
  if (p === null || p === undefined) return "";
  if (p > 0.99) return "> 0.99";
  if (p < 0.01) return "< 0.01";
  return p.toFixed(2);
}

function formatThreshold(t) {
  if (t === null || t === undefined) return "";
  for (let d = 2; d <= 6; d++) {
    const s = t.toFixed(d);
    if (Number(s) > 0 && Number(s) < 1) return s;
  }
  return String(t);
}

const pad = (n) => String(n).padStart(2, "0");

function formatTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  const day = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  const now = new Date(Date.now() + state.skew);
  const today = `${now.getFullYear()}-${pad(now.getMonth() + 1)}-${pad(now.getDate())}`;
  return day === today ? time : `${day} ${time}`;
}

function formatFullTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function timeEl(iso, full) {
  if (!iso) return h("span", { class: "muted" }, "—");
  return h("time", { datetime: iso, title: formatFullTime(iso) },
    full ? formatFullTime(iso) : formatTime(iso));
}

function formatWaiting(iso) {
  const ms = Date.now() + state.skew - new Date(iso).getTime();
  const min = Math.max(0, Math.floor(ms / 60000));
  if (min < 1) return "< 1 min";
  if (min < 60) return `${min} min`;
  const hours = Math.floor(min / 60);
  if (hours < 24) return `${hours} h ${pad(min % 60)} min`;
  const days = Math.floor(hours / 24);
  return `${days} d ${hours % 24} h`;
}

// -- sign-in ------------------------------------------------------------------------------------
function showSignIn(message) {
  state.me = null;
  state.csrf = null;
  closeEvents();
  if ($("study").open) $("study").close();
  for (const id of ["loading", "worklist", "admin", "nav", "who"]) show(id, false);
  show("signin", true);
  setText("signin-error", message);
  $("token").focus();
}

function signedOut(message) {
  if (!state.me) return;
  showSignIn(message);
}

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) {
    setText("signin-error", "Enter your API token.");
    $("token").focus();
    return;
  }
  setText("signin-error", "");
  try {
    const me = await api("POST", "/session", { token });
    $("token").value = "";
    signedIn(me);
  } catch (exc) {
    setText("signin-error", exc.status === 401
      ? "That token is not valid or was revoked." : exc.message);
    $("token").select();
  }
}

async function signOut() {
  try { await api("DELETE", "/session"); } catch (exc) { /* the page forgets it anyway */ }
  showSignIn("Signed out.");
}

function signedIn(me) {
  state.me = me;
  state.csrf = me.csrf_token;
  show("loading", false);
  show("signin", false);
  show("nav", true);
  show("who", true);
  setText("who-name", `${me.name} (${me.role})`);
  show("sign-out", me.via === "session");
  show("nav-admin", me.role === "admin");
  readFiltersFromUrl();
  state.rows = [];
  state.next = null;
  state.version = null;
  rowEls.clear();
  route();
  loadList();
  connectEvents();
}

// -- views --------------------------------------------------------------------------------------
function route() {
  if (!state.me) return;
  const admin = location.hash === "#admin" && state.me.role === "admin";
  state.view = admin ? "admin" : "worklist";
  show("worklist", !admin);
  show("admin", admin);
  $("nav-worklist").setAttribute("aria-current", admin ? "false" : "page");
  $("nav-admin").setAttribute("aria-current", admin ? "page" : "false");
  clearInterval(state.adminTimer);
  if (admin) {
    loadAdmin();
    state.adminTimer = setInterval(() => { if (state.view === "admin") loadAdmin(); }, 10000);
  }
}

function go(view) {
  const hash = view === "admin" ? "#admin" : "";
  history.pushState(null, "", location.pathname + location.search + hash);
  route();
  $("main").focus({ preventScroll: true });
}

// -- filters ------------------------------------------------------------------------------------
function readFiltersFromUrl() {
  const q = new URLSearchParams(location.search);
  const f = state.filters;
  f.status = q.get("status") || "";
  f.accession = q.get("accession") || "";
  f.read = ["read", "all"].includes(q.get("read")) ? q.get("read") : "unread";
  f.since = q.get("since") || "";
  $("f-status").value = f.status;
  $("f-accession").value = f.accession;
  $("f-read").value = f.read;
  $("f-since").value = f.since;
}

function applyFilters(event) {
  if (event) event.preventDefault();
  const f = state.filters;
  f.status = $("f-status").value;
  f.since = $("f-since").value;
  f.accession = $("f-accession").value.trim();
  f.read = $("f-read").value;
  const q = new URLSearchParams();
  for (const k of ["status", "since", "accession"]) if (f[k]) q.set(k, f[k]);
  if (f.read !== "unread") q.set("read", f.read);
  const search = q.toString();
  history.replaceState(null, "", location.pathname + (search ? `?${search}` : "") + location.hash);
  state.rows = [];
  state.next = null;
  state.selected = null;
  state.selectedIndex = 0;
  loadList();
}

function clearFilters() {
  $("f-status").value = "";
  $("f-since").value = "";
  $("f-accession").value = "";
  $("f-read").value = "unread";
  applyFilters();
}

function listQuery(extra) {
  const f = state.filters;
  const q = new URLSearchParams();
  if (f.status) q.set("status", f.status);
  if (f.since) {
    const since = new Date(f.since);
    if (!Number.isNaN(since.getTime())) q.set("since", since.toISOString());
  }
  if (f.accession) q.set("accession", f.accession);
  if (f.read !== "unread") q.set("read", f.read);
  for (const [k, v] of Object.entries(extra)) if (v !== null && v !== undefined) q.set(k, v);
  return q.toString();
}

// -- the list -----------------------------------------------------------------------------------
async function fetchPage(limit, cursor) {
  const body = await api("GET", `/studies?${listQuery({ limit, cursor })}`);
  state.skew = new Date(body.now).getTime() - Date.now();
  return body;
}

// The first page (after sign-in or a filter change).
async function loadList() {
  const seq = ++state.listSeq;
  setText("list-error", "");
  try {
    const body = await fetchPage(PAGE, null);
    if (seq !== state.listSeq) return;
    state.rows = body.studies;
    state.next = body.next;
    state.version = body.version;
    render();
  } catch (exc) {
    if (seq === state.listSeq && exc.status !== 401) setText("list-error", exc.message);
  }
}

// Everything shown again (a change was announced): as many rows as are shown now, so the
// rows loaded with "load more" stay, and the scroll position and the selection with them.
async function refreshList() {
  if (state.refreshing) { state.refreshAgain = true; return state.refreshing; }
  state.refreshing = (async () => {
    do {
      state.refreshAgain = false;
      const seq = ++state.listSeq;
      const want = Math.max(PAGE, state.rows.length);
      try {
        let rows = [];
        let cursor = null;
        let version = null;
        do {
          const body = await fetchPage(Math.min(MAX_LIMIT, want - rows.length), cursor);
          if (version === null) version = body.version;
          rows = rows.concat(body.studies);
          cursor = body.next;
        } while (cursor && rows.length < want);
        if (seq !== state.listSeq) continue;
        state.rows = rows;
        state.next = cursor;
        state.version = version;
        setText("list-error", "");
        render();
      } catch (exc) {
        if (exc.status !== 401) setText("list-error", exc.message);
      }
    } while (state.refreshAgain);
    state.refreshing = null;
  })();
  return state.refreshing;
}

async function loadMore() {
  if (!state.next) return;
  const seq = state.listSeq;
  const button = $("load-more");
  button.disabled = true;
  try {
    const body = await fetchPage(PAGE, state.next);
    if (seq !== state.listSeq) return;
    const have = new Set(state.rows.map((r) => r.study_instance_uid));
    state.rows = state.rows.concat(body.studies.filter((r) => !have.has(r.study_instance_uid)));
    state.next = body.next;
    render();
  } catch (exc) {
    if (exc.status !== 401) setText("list-error", exc.message);
  } finally {
    button.disabled = false;
  }
}

function groupKey(row) {
  if (row.band === "outside") return row.label === SUSPECTED ? "outside-suspected" : "outside-negative";
  return row.band;
}

function labelClass(label) {
  return {
    [SUSPECTED]: "suspected", [NEGATIVE]: "negative", "NOT SCORED": "notscored",
    "PENDING": "pending", "FAILED": "failed",
  }[label] || "pending";
}

function deliveryOf(row) {
  const scored = row.label === SUSPECTED || row.label === NEGATIVE;
  if (row.status === "scored") {
    return (row.deliveries || []).length
      ? ["Queued to send", "wait"] : ["Not sent: no destination configured", "none"];
  }
  if (row.status === "failed" && scored) return DELIVERY.undelivered;
  return DELIVERY[row.status] || [row.status, "none"];
}

function kindName(kind) { return (KIND[kind] || [kind.toUpperCase(), kind])[0]; }

// "SC sent · HL7 retrying": each output's state, the worst over the study's images
function deliveryKinds(list) {
  if (!list || !list.length) return null;
  return h("span", { class: "kinds" }, list.map((d, i) => h("span", {
    class: `kind kind-${d.status}`,
    title: `${(KIND[d.kind] || [0, d.kind])[1]}: ${KIND_STATUS[d.status] || d.status}` +
      (d.attempts ? `, ${d.attempts} ${d.attempts === 1 ? "attempt" : "attempts"}` : "") +
      (d.last_error ? ` (${d.last_error})` : ""),
  }, i ? " · " : "", `${kindName(d.kind)} ${KIND_STATUS[d.status] || d.status}`)));
}

function deliveryText(d) {
  const what = (KIND[d.kind] || [0, d.kind])[1];
  let text = `${what}: ${KIND_STATUS[d.status] || d.status}`;
  if (d.attempts) text += `, ${d.attempts} ${d.attempts === 1 ? "attempt" : "attempts"}`;
  if (d.last_error && d.status !== "sent") text += ` (${d.last_error})`;
  return text;
}

function imageKey(row) {
  // a new picture when the key image changes or the study gets (or loses) its score
  const scored = row.label === SUSPECTED || row.label === NEGATIVE;
  return `${row.key_sop_instance_uid || ""}|${scored}|${row.scored_at || ""}`;
}

function thumbnail(row, size, alt) {
  if (!row.urls || !row.urls.thumbnail) {
    return h("span", { class: "noimage", role: "img", "aria-label": "No image kept" }, "—");
  }
  const scored = row.label === SUSPECTED || row.label === NEGATIVE;
  const img = h("img", {
    alt, width: size, height: size, decoding: "async",
    src: scored ? `${row.urls.heatmap}?size=${size}` : `${row.urls.thumbnail}?size=${size}`,
  });
  if (scored) {
    img.addEventListener("error", () => {
      // no heatmap kept for it: the radiograph alone
      img.src = `${row.urls.thumbnail}?size=${size}`;
      img.alt = alt.replace(" with its heatmap", "");
    }, { once: true });
  }
  return img;
}

function probabilityCell(p, threshold) {
  if (p === null || p === undefined) return h("td", { class: "prob" }, h("span", { class: "muted" }, "—"));
  const fill = h("span", { class: "fill" });
  fill.style.width = `${Math.round(Math.min(1, Math.max(0, p)) * 100)}%`;
  const bar = h("span", { class: "bar", "aria-hidden": "true" }, fill);
  if (threshold !== null && threshold !== undefined) {
    const mark = h("span", { class: "threshold" });
    mark.style.left = `${Math.min(1, Math.max(0, threshold)) * 100}%`;
    bar.append(mark);
  }
  return h("td", { class: "prob" },
    h("span", { class: "num", title: threshold != null ? `threshold ${formatThreshold(threshold)}` : null },
      formatProbability(p)),
    bar);
}

// Study Date + Time as the modality wrote them (its local time: shown as written, never
// converted); without one, the time the worker received the study, marked as such
function studyTimeEl(row, long = false) {
  const st = row.study_datetime;
  if (!st) {
    const el = timeEl(row.received_at, long);
    el.title = "no Study Date in the images: the time received";
    el.classList.add("muted");
    return el;
  }
  const [d, t] = st.split("T");
  const now = new Date();
  const today = `${now.getFullYear()}-${pad(now.getMonth() + 1)}-${pad(now.getDate())}`;
  const text = long || d !== today ? `${d} ${t.slice(0, 5)}` : t.slice(0, 5);
  return h("time", { datetime: st, title: `study ${d} ${t} (the modality's local time)` }, text);
}

function accessionText(row) {
  return row.accession_number || "(no accession)";
}

function buildRow(row) {
  const uid = row.study_instance_uid;
  const cached = rowEls.get(uid);
  const sig = JSON.stringify(row);
  if (cached && cached.sig === sig) return cached.el;
  const acc = accessionText(row);
  const key = imageKey(row);
  let img;
  if (cached && cached.imgKey === key) img = cached.img;
  else img = thumbnail(row, THUMB, `Key image of ${acc}` + (
    row.label === SUSPECTED || row.label === NEGATIVE ? " with its heatmap" : ""));
  const [delivery, dclass] = deliveryOf(row);
  const lclass = labelClass(row.label);
  const result = h("td", { class: "result" },
    h("span", { class: `label lbl-${lclass}` }, row.label));
  if (row.population !== "in_population" && (row.label === SUSPECTED || row.label === NEGATIVE)) {
    result.append(h("span", { class: "population" }, POPULATION[row.population] || row.population));
  }
  if (row.reason && (row.status === "not_scored" || row.status === "failed" ||
      row.status === "retrying" || row.status === "undelivered")) {
    result.append(h("span", { class: "reason" }, row.reason));
  }
  const actions = h("td", { class: "actions" });
  if (row.read_by) {
    actions.append(
      h("span", { class: "readby" }, `Read by ${row.read_by}`, row.read_at ? ", " : "",
        row.read_at ? timeEl(row.read_at) : ""),
      h("button", { type: "button", class: "quiet unread", onclick: () => putBack(uid, acc) },
        "Put back", h("span", { class: "visually-hidden" }, ` ${acc}`)));
  } else {
    actions.append(h("button", { type: "button", class: "quiet mark", onclick: () => markRead(uid, acc) },
      "Mark read", h("span", { class: "visually-hidden" }, ` ${acc}`)));
  }
  const tr = h("tr", {
    class: `row row-${lclass}`, tabindex: "-1", dataset: { uid },
  },
  h("td", { class: "thumb" }, img),
  h("td", { class: "acc" },
    h("button", { type: "button", class: "link open", onclick: () => openStudy(uid) }, acc),
    h("span", { class: "images muted" }, row.images === 1 ? "1 image" : `${row.images} images`)),
  h("td", { class: "when" }, studyTimeEl(row)),
  h("td", { class: "waiting", dataset: { since: row.received_at } }, formatWaiting(row.received_at)),
  result,
  probabilityCell(row.probability, row.threshold),
  h("td", { class: "delivery" }, h("span", { class: `dlv dlv-${dclass}` }, delivery),
    deliveryKinds(row.deliveries)),
  actions);
  tr.addEventListener("click", (event) => {
    if (event.target.closest("button, a, input")) return;
    select(uid, { focus: true });
    openStudy(uid);
  });
  tr.addEventListener("focus", () => select(uid, { focus: false }));
  rowEls.set(uid, { el: tr, sig, img, imgKey: key });
  return tr;
}

function captureAnchor() {
  // the row the reader is looking at: the selected one if on screen, else the first on screen
  const table = $("studies");
  const rows = [...table.querySelectorAll("tr.row")];
  const top = table.getBoundingClientRect().top;
  const onScreen = (el) => {
    const r = el.getBoundingClientRect();
    return r.bottom > 0 && r.top < window.innerHeight;
  };
  if (window.scrollY === 0 && top >= 0) return null; // at the top: stay at the top
  let el = state.selected && rowEls.get(state.selected) && rowEls.get(state.selected).el;
  if (!el || !el.isConnected || !onScreen(el)) el = rows.find(onScreen);
  return el ? { uid: el.dataset.uid, top: el.getBoundingClientRect().top, y: window.scrollY } : null;
}

function render() {
  const table = $("studies");
  const active = document.activeElement;
  const hadFocus = active && active.closest && active.closest("#studies tr.row");
  const focusedUid = hadFocus ? hadFocus.dataset.uid : null;
  const focusedButton = hadFocus && active.matches("button") ? [...hadFocus.querySelectorAll("button")].indexOf(active) : -1;
  const anchor = captureAnchor();

  const groups = [];
  for (const row of state.rows) {
    const key = groupKey(row);
    let g = groups[groups.length - 1];
    if (!g || g.key !== key) { g = { key, rows: [] }; groups.push(g); }
    g.rows.push(row);
  }
  const seen = new Set();
  const bodies = groups.map((g, i) => {
    const more = state.next && i === groups.length - 1;
    const count = `${g.rows.length}${more ? " shown, more below" : ""}`;
    const headId = `band-${g.key}`;
    const tb = h("tbody", { class: `band band-${g.key}` },
      h("tr", { class: "band-head" },
        h("th", { scope: "colgroup", colSpan: 8, id: headId },
          BAND_TITLES[g.key] || g.key, h("span", { class: "band-count" }, ` (${count})`))));
    for (const row of g.rows) {
      seen.add(row.study_instance_uid);
      tb.append(buildRow(row));
    }
    return tb;
  });
  for (const tb of [...table.tBodies]) tb.remove();
  table.append(...bodies);
  for (const uid of [...rowEls.keys()]) if (!seen.has(uid)) rowEls.delete(uid);

  // the selection: the same study, or the one that took its place
  const uids = state.rows.map((r) => r.study_instance_uid);
  if (state.selected && !seen.has(state.selected)) {
    state.selected = uids.length ? uids[Math.min(state.selectedIndex, uids.length - 1)] : null;
  }
  markSelected();
  if (focusedUid !== null && state.selected) {
    const el = rowEls.get(state.selected).el;
    const buttons = el.querySelectorAll("button");
    const target = focusedUid === state.selected && focusedButton >= 0 && buttons[focusedButton]
      ? buttons[focusedButton] : el;
    target.focus({ preventScroll: true });
  }
  if (anchor) {
    const entry = rowEls.get(anchor.uid);
    if (entry && entry.el.isConnected) {
      const delta = entry.el.getBoundingClientRect().top - anchor.top;
      if (Math.abs(delta) >= 1) window.scrollBy(0, delta);
    } else {
      window.scrollTo(0, anchor.y);
    }
  }

  show("empty", state.rows.length === 0);
  setText("empty", state.filters.read === "unread" && !state.filters.status &&
    !state.filters.since && !state.filters.accession
    ? "No studies to read." : "No study matches these filters.");
  show("load-more", Boolean(state.next));
  const n = state.rows.length;
  setText("count", n === 0 ? "" : state.next
    ? `${n} studies shown; more to load.` : `${n} ${n === 1 ? "study" : "studies"}: the whole list.`);
}

function markSelected() {
  for (const [uid, entry] of rowEls) {
    const on = uid === state.selected;
    entry.el.classList.toggle("selected", on);
    entry.el.tabIndex = on ? 0 : -1;
    if (on) entry.el.setAttribute("aria-current", "true");
    else entry.el.removeAttribute("aria-current");
  }
  // with nothing selected, the first row takes the tab stop
  if (!state.selected && state.rows.length) {
    const first = rowEls.get(state.rows[0].study_instance_uid);
    if (first) first.el.tabIndex = 0;
  }
}

function select(uid, { focus }) {
  if (!uid) return;
  state.selected = uid;
  const i = state.rows.findIndex((r) => r.study_instance_uid === uid);
  if (i >= 0) state.selectedIndex = i;
  markSelected();
  const entry = rowEls.get(uid);
  if (entry && focus) {
    if (document.activeElement !== entry.el && !entry.el.contains(document.activeElement)) {
      entry.el.focus({ preventScroll: true });
    }
    entry.el.scrollIntoView({ block: "nearest" });
  }
}

function move(step) {
  if (!state.rows.length) return;
  const uids = state.rows.map((r) => r.study_instance_uid);
  let i = uids.indexOf(state.selected);
  if (i < 0) i = step > 0 ? 0 : uids.length - 1;
  else i = Math.min(uids.length - 1, Math.max(0, i + step));
  select(uids[i], { focus: true });
}

function tickWaiting() {
  for (const td of document.querySelectorAll("#studies td.waiting")) {
    td.textContent = formatWaiting(td.dataset.since);
  }
}

// -- read marks ---------------------------------------------------------------------------------
async function markRead(uid, acc) {
  try {
    await api("POST", `/studies/${enc(uid)}/read`);
    toast(`${acc} marked read.`);
    if (state.openUid === uid && $("study").open) $("study").close();
    if (state.filters.read === "unread") {
      // it leaves the list now; the refresh confirms
      const i = state.rows.findIndex((r) => r.study_instance_uid === uid);
      if (i >= 0) {
        state.rows.splice(i, 1);
        if (state.selected === uid) state.selectedIndex = i;
        render();
      }
    }
    refreshList();
  } catch (exc) {
    if (exc.status !== 401) toast(`Could not mark ${acc} read: ${exc.message}`);
  }
}

async function putBack(uid, acc) {
  try {
    await api("DELETE", `/studies/${enc(uid)}/read`);
    toast(`${acc} is back on the list.`);
    if (state.openUid === uid && $("study").open) loadStudy(uid);
    refreshList();
  } catch (exc) {
    if (exc.status !== 401) toast(`Could not put ${acc} back: ${exc.message}`);
  }
}

// -- one study ----------------------------------------------------------------------------------
function openStudy(uid) {
  const dialog = $("study");
  state.openUid = uid;
  state.openSig = null;
  if (state.rows.some((r) => r.study_instance_uid === uid)) select(uid, { focus: false });
  const row = state.rows.find((r) => r.study_instance_uid === uid);
  setText("study-title", row ? `Study ${accessionText(row)}` : "Study");
  setText("study-error", "");
  $("study-facts").replaceChildren();
  $("study-images").replaceChildren(h("p", { class: "muted" }, "Loading…"));
  show("study-replay-box", false);
  if (!dialog.open) dialog.showModal();
  $("study-close").focus();
  loadStudy(uid);
}

async function loadStudy(uid) {
  try {
    const body = await api("GET", `/studies/${enc(uid)}`);
    if (state.openUid !== uid || !$("study").open) return;
    renderStudy(body);
  } catch (exc) {
    if (state.openUid === uid && exc.status !== 401) {
      setText("study-error", exc.status === 404 ? "This study is no longer in the worklist." : exc.message);
    }
  }
}

function fact(dl, term, ...value) {
  const div = h("div", { class: "fact" }, h("dt", {}, term), h("dd", {}, ...value));
  dl.append(div);
  return div;
}

function renderStudy(body) {
  const s = body.study;
  const acc = accessionText(s);
  setText("study-title", `Study ${acc}`);
  const facts = h("dl", { class: "facts", id: "study-facts" });
  fact(facts, "Result", h("span", { class: `label lbl-${labelClass(s.label)}` }, s.label));
  if (s.probability !== null) fact(facts, "Probability", formatProbability(s.probability));
  if (s.threshold !== null) fact(facts, "Threshold", formatThreshold(s.threshold));
  if (s.model_version) fact(facts, "Model version", s.model_version);
  fact(facts, "Population", POPULATION[s.population] || s.population);
  fact(facts, "Delivery", deliveryOf(s)[0]);
  for (const d of s.deliveries || []) fact(facts, (KIND[d.kind] || [0, d.kind])[1], deliveryText(d).replace(/^[^:]*: /, ""));
  fact(facts, "Images", String(s.images));
  fact(facts, "Study time", studyTimeEl(s, true));
  fact(facts, "Received", timeEl(s.received_at, true));
  fact(facts, "Scored", timeEl(s.scored_at, true));
  fact(facts, "Sent", timeEl(s.sent_at, true));
  if (s.read_by) fact(facts, "Read", `by ${s.read_by}, `, timeEl(s.read_at, true));
  if (body.sending_paused) fact(facts, "Sending", "paused by an administrator");
  const reasons = [...new Set(body.instances.map((i) => i.reason).filter(Boolean))];
  if (reasons.length) fact(facts, reasons.length === 1 ? "Reason" : "Reasons",
    h("ul", { class: "reasons" }, reasons.map((r) => h("li", {}, r))));
  $("study-facts").replaceWith(facts);

  const read = $("study-read");
  read.textContent = s.read_by ? "Put back on the list" : "Mark read";
  read.onclick = () => (s.read_by ? putBack(s.study_instance_uid, acc) : markRead(s.study_instance_uid, acc));
  show("study-replay-box", state.me && state.me.role === "admin");
  show("study-replay", true);
  show("study-replay-confirm", false);
  $("study-replay").onclick = () => {
    setText("study-replay-question", `Replay the ${s.images === 1 ? "image" : `${s.images} images`} of ${acc} through the pipeline?`);
    show("study-replay", false);
    show("study-replay-confirm", true);
    $("study-replay-yes").focus();
  };
  $("study-replay-no").onclick = () => {
    show("study-replay-confirm", false);
    show("study-replay", true);
    $("study-replay").focus();
  };
  $("study-replay-yes").onclick = () => replay(s.study_instance_uid, acc);

  // the images: rebuilt only when they changed (a toggle stays as the reader left it)
  const sig = JSON.stringify(body.instances.map((i) => [i.sop_instance_uid, i.heatmap_available, i.scored_at]));
  if (sig === state.openSig) {
    // the same images: the words under them only
    const lists = $("study-images").querySelectorAll("figcaption dl");
    const alone = body.instances.length === 1;
    body.instances.forEach((inst, k) => { if (lists[k]) lists[k].replaceWith(instanceFacts(inst, alone)); });
    return;
  }
  state.openSig = sig;
  const n = body.instances.length;
  $("study-images").replaceChildren(...body.instances.map((inst, k) => {
    const name = n === 1 ? "The image" : `Image ${k + 1} of ${n}`;
    const sop = inst.sop_instance_uid;
    const on = inst.heatmap_available && state.heatOn.get(sop) !== false;
    const img = h("img", { class: "radiograph", decoding: "async" });
    const setImage = (heat) => {
      img.src = `${heat ? inst.urls.heatmap : inst.urls.thumbnail}?size=${FULL}`;
      img.alt = `${name} of ${acc}${heat ? ", with the heatmap over it" : ""}`;
    };
    setImage(on);
    const id = `heat-${k}`;
    const toggle = inst.heatmap_available
      ? h("div", { class: "toggle" },
        h("input", { type: "checkbox", id, checked: on, onchange: (e) => {
          state.heatOn.set(sop, e.target.checked);
          setImage(e.target.checked);
        } }),
        h("label", { for: id }, "Show the heatmap"))
      : h("p", { class: "muted" }, inst.label ? "No heatmap kept for this image." : "No heatmap: not scored.");
    return h("figure", { class: "image" }, img,
      h("figcaption", {}, h("span", { class: "figname" }, name), toggle, instanceFacts(inst, n === 1)));
  }));
}

function instanceFacts(inst, alone) {
  // alone: the study's only image, whose result, model and times the study's facts give
  const meta = h("dl", { class: "facts small" });
  if (alone) {
    fact(meta, "Status", inst.status.replace("_", " "));
    if (inst.deliveries && inst.deliveries.length) {
      fact(meta, "Results", h("ul", { class: "reasons" }, inst.deliveries.map((d) => h("li", {}, deliveryText(d)))));
    }
    return meta;
  }
  if (inst.label) fact(meta, "Result", h("span", { class: `label lbl-${labelClass(inst.label)}` }, inst.label));
  if (inst.probability !== null) fact(meta, "Probability", formatProbability(inst.probability));
  if (inst.threshold !== null) fact(meta, "Threshold", formatThreshold(inst.threshold));
  if (inst.model_version) fact(meta, "Model version", inst.model_version);
  if (inst.population) fact(meta, "Population", POPULATION[inst.population] || inst.population);
  fact(meta, "Status", inst.status.replace("_", " "));
  if (inst.delivery) fact(meta, "Delivery", INSTANCE_DELIVERY[inst.delivery] || inst.delivery);
  if (inst.deliveries && inst.deliveries.length) {
    fact(meta, "Results", h("ul", { class: "reasons" }, inst.deliveries.map((d) => h("li", {}, deliveryText(d)))));
  }
  if (inst.reason) fact(meta, "Reason", inst.reason);
  fact(meta, "Received", timeEl(inst.received_at, true));
  if (inst.scored_at) fact(meta, "Scored", timeEl(inst.scored_at, true));
  if (inst.sent_at) fact(meta, "Sent", timeEl(inst.sent_at, true));
  return meta;
}

async function replay(uid, acc) {
  try {
    const body = await api("POST", `/studies/${enc(uid)}/replay`);
    toast(`Replay of ${acc}: ${body.requeued} ${body.requeued === 1 ? "image" : "images"} queued.`);
    show("study-replay-confirm", false);
    show("study-replay", true);
    loadStudy(uid);
  } catch (exc) {
    if (exc.status !== 401) toast(`Could not replay ${acc}: ${exc.message}`);
  }
}

function studyClosed() {
  const uid = state.openUid;
  state.openUid = null;
  state.openSig = null;
  $("study-images").replaceChildren();
  if (state.view === "worklist") {
    const entry = uid && rowEls.get(uid);
    const target = entry ? entry.el : (state.selected && rowEls.get(state.selected) && rowEls.get(state.selected).el);
    if (target) target.focus({ preventScroll: true });
  }
}

// -- admin --------------------------------------------------------------------------------------
async function loadAdmin() {
  setText("admin-error", "");
  try {
    const [summary, dead] = await Promise.all([
      api("GET", "/admin/summary"), api("GET", `/admin/dead-letters?limit=${PAGE}`)]);
    renderSummary(summary);
    renderDead(dead.instances, false);
    state.deadNext = dead.next;
    show("dead-more", Boolean(dead.next));
  } catch (exc) {
    if (exc.status !== 401) setText("admin-error", exc.message);
  }
}

async function loadMoreDead() {
  if (!state.deadNext) return;
  try {
    const dead = await api("GET", `/admin/dead-letters?limit=${PAGE}&cursor=${enc(state.deadNext)}`);
    renderDead(dead.instances, true);
    state.deadNext = dead.next;
    show("dead-more", Boolean(dead.next));
  } catch (exc) {
    if (exc.status !== 401) setText("admin-error", exc.message);
  }
}

function renderSummary(s) {
  const sending = s.sending;
  const state_ = $("sending-state");
  state_.replaceChildren(sending.sending_paused
    ? h("span", {}, h("strong", { class: "warn" }, "Paused. "),
      "Results are built and listed, and wait to be sent.",
      sending.updated_by ? ` Paused by ${sending.updated_by}` : "",
      sending.updated_at ? [", ", timeEl(sending.updated_at, true)] : "", ".")
    : s.pacs.configured
      ? h("span", {}, h("strong", { class: "ok" }, "Active. "), "Results go to the PACS as they are built.")
      : h("span", {}, h("strong", {}, "Active, "), "but no PACS is configured: results stay here."));
  const toggle = $("sending-toggle");
  toggle.textContent = sending.sending_paused ? "Resume sending" : "Pause sending";
  toggle.onclick = () => setSending(!sending.sending_paused);

  const pacs = h("dl", { class: "facts", id: "pacs" });
  if (!s.pacs.configured) {
    fact(pacs, "PACS", "none configured");
  } else {
    fact(pacs, "AE title", s.pacs.ae_title || "");
    fact(pacs, "Address", `${s.pacs.host}:${s.pacs.port}`);
    const echo = s.pacs.last_echo;
    if (s.mode === "web") fact(pacs, "Last C-ECHO", "checked by cxr-worker serve, not by this web process");
    else if (!echo || echo.ok === null) fact(pacs, "Last C-ECHO", "not yet");
    else if (echo.ok) fact(pacs, "Last C-ECHO", h("strong", { class: "ok" }, "OK"), " at ", timeEl(echo.at, true));
    else {
      fact(pacs, "Last C-ECHO", h("strong", { class: "bad" }, "failed"), " at ", timeEl(echo.at, true),
        echo.error ? `: ${echo.error}` : "").classList.add("wide");
    }
  }
  $("pacs").replaceWith(pacs);

  const q = h("dl", { class: "facts", id: "queue" });
  fact(q, "To score now", String(s.queue_depth.process));
  fact(q, "To send now", String(s.queue_depth.send));
  fact(q, "Retrying", String(s.retrying));
  fact(q, "Dead letters", String(s.dead_letters));
  if (s.undelivered !== undefined) fact(q, "Undelivered images", String(s.undelivered));
  for (const [kind, by] of Object.entries(s.deliveries || {})) {
    const parts = Object.entries(by).filter(([, n]) => n).map(([st, n]) => `${n} ${KIND_STATUS[st] || st}`);
    fact(q, (KIND[kind] || [0, kind])[1], parts.join(", ") || "none").classList.add("wide");
  }
  $("queue").replaceWith(q);
  const names = { received: "Waiting to be scored", scored: "Scored, not sent", sent: "Sent",
    held: "Held", not_scored: "Not scored", failed: "Failed" };
  const per = h("dl", { class: "facts", id: "per-status" });
  for (const [k, n] of Object.entries(s.images)) fact(per, names[k] || k, String(n));
  $("per-status").replaceWith(per);
}

function renderDead(instances, append) {
  const tbody = $("dead").tBodies[0];
  if (!append) tbody.replaceChildren();
  for (const inst of instances) {
    const acc = inst.accession_number || "(no accession)";
    const undelivered = inst.status !== "failed";
    const what = undelivered ? "send again" : "process again";
    const failed = (inst.deliveries || []).filter((d) => d.status === "failed");
    const reason = inst.reason || failed.map(deliveryText).join("; ") || "";
    tbody.append(h("tr", { dataset: { sop: inst.sop_instance_uid } },
      h("td", {}, h("button", { type: "button", class: "link", onclick: () => openStudy(inst.study_instance_uid) }, acc)),
      h("td", { class: "uid" }, h("span", { title: inst.sop_instance_uid }, `…${inst.sop_instance_uid.slice(-12)}`)),
      h("td", {}, timeEl(inst.received_at)),
      h("td", { class: "why" }, reason),
      h("td", {}, h("button", { type: "button", class: "retry", onclick: (e) => retry(inst.sop_instance_uid, acc, e.currentTarget) },
        "Retry", h("span", { class: "visually-hidden" }, ` ${acc} (${what})`)))));
  }
  const empty = tbody.children.length === 0;
  show("dead-empty", empty);
  $("dead").hidden = empty;
}

async function retry(sop, acc, button) {
  button.disabled = true;
  try {
    const body = await api("POST", `/instances/${enc(sop)}/retry`);
    toast(body.retry === "send" ? `${acc}: the result will be sent again.` : `${acc}: the image goes through the pipeline again.`);
    await loadAdmin();
    refreshList();
  } catch (exc) {
    button.disabled = false;
    if (exc.status !== 401) toast(`Could not retry ${acc}: ${exc.message}`);
  }
}

async function setSending(pause) {
  try {
    await api("POST", pause ? "/sending/pause" : "/sending/resume");
    toast(pause ? "Sending paused." : "Sending resumed.");
    await loadAdmin();
  } catch (exc) {
    if (exc.status !== 401) toast(`Could not ${pause ? "pause" : "resume"} sending: ${exc.message}`);
  }
}

// -- live updates -------------------------------------------------------------------------------
function setLive(live) {
  state.live = live;
  const el = $("live");
  el.textContent = live ? "Live: the list updates itself." : "Reconnecting… the list may be out of date.";
  el.classList.toggle("offline", !live);
}

function changed() {
  refreshList();
  if ($("study").open && state.openUid) loadStudy(state.openUid);
  if (state.view === "admin") loadAdmin();
}

function connectEvents() {
  closeEvents();
  const source = new EventSource(`${API}/events`);
  state.source = source;
  source.addEventListener("changed", (event) => {
    let version = null;
    try { version = JSON.parse(event.data).version; } catch (exc) { return; }
    if (!state.live) setLive(true);
    if (version !== state.version) changed();
  });
  source.addEventListener("open", () => setLive(true));
  source.addEventListener("error", () => {
    if (state.source !== source) return;
    setLive(false);
    if (source.readyState === EventSource.CLOSED) {
      // refused (401, or the server went away for good): check the session, then try again
      setTimeout(async () => {
        if (state.source !== source || !state.me) return;
        try {
          await api("GET", "/session");
          connectEvents();
          changed();
        } catch (exc) {
          if (exc.status === 401) signedOut("Your session ended: sign in again.");
          else if (state.source === source) setTimeout(connectEvents, 5000);
        }
      }, 3000);
    }
  });
}

function closeEvents() {
  if (state.source) state.source.close();
  state.source = null;
}

// -- keys ---------------------------------------------------------------------------------------
function onKey(event) {
  if (event.defaultPrevented || event.altKey || event.ctrlKey || event.metaKey) return;
  if (!state.me || state.view !== "worklist" || $("study").open) return;
  const t = event.target;
  if (t.closest && t.closest("input, select, textarea, [contenteditable], dialog")) return;
  const inList = t === document.body || t.id === "main" || (t.closest && t.closest("#studies"));
  if (event.key === "j" || (event.key === "ArrowDown" && inList)) {
    event.preventDefault();
    move(1);
  } else if (event.key === "k" || (event.key === "ArrowUp" && inList)) {
    event.preventDefault();
    move(-1);
  } else if (event.key === "Enter" && inList && !t.closest("button, a")) {
    if (state.selected) {
      event.preventDefault();
      openStudy(state.selected);
    }
  }
}

// -- start --------------------------------------------------------------------------------------
async function boot() {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("nav-worklist").addEventListener("click", () => go("worklist"));
  $("nav-admin").addEventListener("click", () => go("admin"));
  $("filters").addEventListener("submit", applyFilters);
  $("f-clear").addEventListener("click", clearFilters);
  $("load-more").addEventListener("click", loadMore);
  $("dead-more").addEventListener("click", loadMoreDead);
  $("study-close").addEventListener("click", () => $("study").close());
  $("study").addEventListener("close", studyClosed);
  window.addEventListener("popstate", () => { readFiltersFromUrl(); route(); loadList(); });
  document.addEventListener("keydown", onKey);
  setInterval(tickWaiting, 30000);
  // without events (a proxy that buffers them), a look every 30 s
  setInterval(() => { if (state.me && !state.live) changed(); }, 30000);

  for (let attempt = 0; ; attempt++) {
    try {
      signedIn(await api("GET", "/session"));
      return;
    } catch (exc) {
      if (exc.status === 401) { showSignIn(""); return; }
      setText("loading", `The worker is not ready (${exc.message}); trying again…`);
      await new Promise((resolve) => setTimeout(resolve, Math.min(10000, 1000 * (attempt + 1))));
    }
  }
}

boot();
