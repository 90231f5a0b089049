// EKM console: one ES module, no framework. It talks to the HTTP API with the bearer token
// the user signed in with; the token lives in sessionStorage (this tab only), never in a URL.

const TOKEN_KEY = "ekm.token";
const PAGE = 50;
const REQUEST_TIMEOUT_MS = 30000;
const $ = (id) => document.getElementById(id);

const session = { me: null, org: null, selected: null, expanded: new Set() };

// ---------------------------------------------------------------------------------------
// Talking to the API.

class ApiProblem extends Error {
  constructor(status, problem) {
    super(describeProblem(status, problem));
    this.status = status;
    this.problem = problem || {};
  }
}

function describeProblem(status, problem) {
  if (problem && (problem.title || problem.detail)) {
    const title = problem.title || "Refused";
    return problem.detail ? `${title}: ${problem.detail}` : title;
  }
  return `The server answered with status ${status}.`;
}

async function api(method, path, body, timeoutMs = REQUEST_TIMEOUT_MS) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}` };
  // A request that hangs ends with a message instead of a button disabled for ever.
  const init = { method, headers, cache: "no-store", signal: AbortSignal.timeout(timeoutMs) };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error && error.name === "TimeoutError") {
      throw new Error(`The EKM server did not answer within ${timeoutMs / 1000} seconds. Try again.`);
    }
    throw new Error("Could not reach the EKM server. Check the connection and try again.");
  }
  if (response.status === 401 && path !== "/v1/me") {
    signOut("Your token is no longer accepted. Sign in again.");
  }
  return response;
}

async function json(method, path, body) {
  const response = await api(method, path, body);
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  if (!response.ok) throw new ApiProblem(response.status, data);
  if (data === null) throw new Error("The server's answer could not be read. Try again.");
  return data;
}

// ---------------------------------------------------------------------------------------
// Messages and busy buttons.

// An error shows next to the form it came from (where the user is looking), else at the top.
function showError(error, near) {
  const box = near?.closest("form")?.querySelector(".form-error") || $("error");
  box.textContent = error instanceof Error ? error.message : String(error);
  box.hidden = false;
}

function clearError() {
  for (const box of [$("error"), ...document.querySelectorAll(".form-error")]) {
    box.hidden = true;
    box.textContent = "";
  }
}

function say(text) {
  $("status").textContent = text;
}

// Runs `work` with `button` disabled; shows a failure in words, never as raw JSON.
async function busy(button, work) {
  if (button.disabled) return;
  // Disabling the focused button would drop keyboard focus to the page: give it back after.
  const hadFocus = document.activeElement === button;
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  clearError();
  try {
    await work();
  } catch (error) {
    // A refused token has signed the user out with its own message: keep that one.
    if (!(error instanceof ApiProblem && error.status === 401 && !session.me)) showError(error, button);
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
    if (session.selected) applyActionButtons(session.selected);
    if (hadFocus && button.isConnected && !button.hidden && document.activeElement === document.body) {
      button.focus();
    }
  }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

function formatTime(at) {
  if (!at) return "";
  const date = new Date(at);
  if (Number.isNaN(date.getTime())) return at;
  return date.toISOString().replace("T", " ").slice(0, 16) + " UTC";
}

// datetime-local value (read as UTC) → RFC 3339.
function toRfc3339(value) {
  if (!value) return "";
  const withSeconds = value.length === 16 ? `${value}:00` : value;
  return `${withSeconds}Z`;
}

function actorName(actor) {
  if (!actor) return "someone";
  const colon = actor.indexOf(":");
  return colon >= 0 && /^(user|service|operator|system):/.test(actor) ? actor.slice(colon + 1) : actor;
}

// "paused by team research — 2026-11-28 14:02 UTC by alice: investigation 4711"
function describeCause(scope) {
  const cause = scope.cause;
  if (!cause) return "";
  const state = scope.effective_state;
  const where = cause.scope_id === scope.id ? "here" : `by ${cause.scope_kind} ${cause.scope_name}`;
  let text = `${state} ${where}`;
  if (state === "unavailable") {
    text = `unavailable: the master key of ${cause.scope_kind} ${cause.scope_name} cannot be used`;
  }
  if (cause.at) text += ` — ${formatTime(cause.at)}`;
  if (cause.actor) text += ` by ${actorName(cause.actor)}`;
  if (cause.reason) text += `: ${cause.reason}`;
  if (cause.due_at) text += `; revoked for good at ${formatTime(cause.due_at)} unless cancelled`;
  return text;
}

// "6 d 23 h 59 min 58 s": what is left until `at`.
function timeLeft(at) {
  let seconds = Math.max(0, Math.floor((new Date(at).getTime() - Date.now()) / 1000));
  const parts = [];
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["min", 60]]) {
    const n = Math.floor(seconds / size);
    seconds -= n * size;
    if (n > 0 || parts.length) parts.push(`${n} ${unit}`);
  }
  parts.push(`${seconds} s`);
  return parts.join(" ");
}

// ---------------------------------------------------------------------------------------
// What the token may do.

function holds(permission, path) {
  const me = session.me;
  if (!me) return false;
  if (me.permissions.includes(permission)) return true;
  const implies = (held) => held === permission || (held === "encryption:manage" && permission === "encryption:view");
  return me.grants.some((g) => implies(g.permission) && (g.scope_id === null || path.includes(g.scope_id)));
}

// ---------------------------------------------------------------------------------------
// Signing in and out.

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  let me;
  try {
    me = await json("GET", "/v1/me");
  } catch (error) {
    // Forget the token only when it is refused, not when the network blinks.
    if (error instanceof ApiProblem && error.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      throw new Error("This token is not accepted (unknown, revoked or expired).");
    }
    throw error;
  }
  if (!me.org_id) {
    sessionStorage.removeItem(TOKEN_KEY);
    throw new Error("This is the platform operator token. Sign in with an organization's token (for example its admin token).");
  }
  session.me = me;
  $("signin-view").hidden = true;
  $("app-view").hidden = false;
  $("sign-out").hidden = false;
  $("who").hidden = false;
  $("who").textContent = `Signed in as ${me.principal} (${me.role})`;
  $("token").value = "";
  try {
    session.org = await json("GET", `/v1/orgs/${me.org_id}`);
    $("who").textContent = `${session.org.name} — signed in as ${me.principal} (${me.role})`;
  } catch (error) {
    session.org = null;
  }
  showView("scopes");
  await loadTree();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  session.me = null;
  session.org = null;
  session.selected = null;
  session.expanded.clear();
  $("app-view").hidden = true;
  $("signin-view").hidden = false;
  $("sign-out").hidden = true;
  $("who").hidden = true;
  $("tree").replaceChildren();
  $("audit-rows").replaceChildren();
  $("access-rows").replaceChildren();
  $("access-more").hidden = true;
  $("who-could-result").replaceChildren();
  $("detail-panel").hidden = true;
  // Nothing of the previous organization may show to the next token.
  $("search-results").hidden = true;
  $("search-list").replaceChildren();
  $("tree-panel").hidden = false;
  $("mk-facts").replaceChildren();
  $("verify-result").hidden = true;
  $("verify-result").textContent = "";
  $("action-form").hidden = true;
  if (message) showError(message);
  else clearError();
  say("Signed out.");
  $("token").focus();
}

function showView(name) {
  for (const view of ["scopes", "master-key", "audit"]) {
    $(`${view}-view`).hidden = view !== name;
  }
  for (const button of document.querySelectorAll("[data-view]")) {
    if (button.dataset.view === name) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  if (name === "master-key") loadMasterKey().catch(showError);
  if (name === "audit" && $("audit-rows").children.length === 0) loadAudit().catch(showError);
}

// ---------------------------------------------------------------------------------------
// The scope tree.

function stateBadge(label, state) {
  return el("span", { class: `badge state-${state}` }, `${label}: ${state}`);
}

function scopeNode(scope) {
  const li = el("li", { "data-scope-id": scope.id, class: "scope" });
  const row = el("div", { class: "row" });
  // The built-in leaves have no children by default; every other kind (the organization,
  // teams, and the platform's own kinds, ADR 0034) may.
  const canHaveChildren = !["thread", "mcp_connector", "agent"].includes(scope.kind);
  if (canHaveChildren) {
    const toggle = el("button", { type: "button", class: "toggle" }, "Show children");
    toggle.setAttribute("aria-expanded", "false");
    toggle.setAttribute("aria-label", `Show children of ${scope.name}`);
    toggle.addEventListener("click", () => busy(toggle, () => toggleChildren(li, scope, toggle)));
    row.append(toggle);
  }
  const select = el("button", { type: "button", class: "select" }, scope.name);
  select.setAttribute("aria-label", `${scope.name} (${scope.kind}): open details`);
  select.addEventListener("click", () => selectScope(scope.id).catch(showError));
  row.append(select, el("span", { class: "kind" }, scope.kind));
  row.append(stateBadge("own", scope.own_state), stateBadge("effective", scope.effective_state));
  li.append(row);
  if (scope.cause) li.append(el("p", { class: "cause" }, describeCause(scope)));
  return li;
}

async function toggleChildren(li, scope, toggle) {
  const open = toggle.getAttribute("aria-expanded") === "true";
  if (open) {
    li.querySelector(":scope > ul")?.remove();
    li.querySelector(":scope > .more")?.remove();
    toggle.setAttribute("aria-expanded", "false");
    toggle.textContent = "Show children";
    session.expanded.delete(scope.id);
    return;
  }
  await loadChildren(li, scope.id);
  toggle.setAttribute("aria-expanded", "true");
  toggle.textContent = "Hide children";
  session.expanded.add(scope.id);
}

async function loadChildren(li, id, cursor, list) {
  let url = `/v1/scopes/${id}/children?limit=${PAGE}`;
  if (cursor) url += `&cursor=${encodeURIComponent(cursor)}`;
  const page = await json("GET", url);
  if (!list) {
    list = el("ul", { class: "scope-list" });
    li.append(list);
  }
  li.querySelector(":scope > .more")?.remove();
  for (const child of page.items) list.append(scopeNode(child));
  if (!cursor && page.items.length === 0) list.append(el("li", { class: "empty" }, "No children."));
  if (page.next_cursor) {
    const more = el("button", { type: "button", class: "more" }, "Load more");
    more.addEventListener("click", () => busy(more, () => loadChildren(li, id, page.next_cursor, list)));
    li.append(more);
  }
  // Children that were open before a refresh open again.
  for (const child of page.items) {
    if (session.expanded.has(child.id)) {
      const childLi = list.querySelector(`[data-scope-id="${child.id}"]`);
      const toggle = childLi?.querySelector(":scope > .row > .toggle");
      if (childLi && toggle) {
        await loadChildren(childLi, child.id);
        toggle.setAttribute("aria-expanded", "true");
        toggle.textContent = "Hide children";
      }
    }
  }
}

// The organization, or, for a token that may view only some subtrees, those subtrees.
async function loadTree() {
  let roots;
  if (holds("encryption:view", [session.me.org_id])) {
    roots = [await json("GET", `/v1/scopes/${session.me.org_id}`)];
  } else {
    const ids = [...new Set(session.me.grants
      .filter((g) => g.scope_id && (g.permission === "encryption:view" || g.permission === "encryption:manage"))
      .map((g) => g.scope_id))];
    roots = [];
    for (const id of ids) roots.push(await json("GET", `/v1/scopes/${id}`));
  }
  const tree = $("tree");
  tree.replaceChildren(...roots.map(scopeNode));
  if (roots.length === 0) {
    tree.append(el("li", { class: "empty" }, "This token may not view any scope. An org admin can grant encryption:view."));
  }
  for (const scope of roots) {
    const toggle = tree.querySelector(`[data-scope-id="${scope.id}"] > .row > .toggle`);
    if (!toggle || (roots.length > 1 && !session.expanded.has(scope.id))) continue;
    session.expanded.add(scope.id);
    await loadChildren(toggle.closest("li"), scope.id);
    toggle.setAttribute("aria-expanded", "true");
    toggle.textContent = "Hide children";
  }
}

async function search(cursor) {
  const q = $("search-q").value.trim();
  let url = `/v1/orgs/${session.me.org_id}/scopes?limit=${PAGE}&q=${encodeURIComponent(q)}`;
  if (cursor) url += `&cursor=${encodeURIComponent(cursor)}`;
  const page = await json("GET", url);
  const list = $("search-list");
  if (!cursor) list.replaceChildren();
  for (const scope of page.items) list.append(scopeNode(scope));
  $("search-results").hidden = false;
  $("tree-panel").hidden = true;
  const more = $("search-more");
  more.hidden = !page.next_cursor;
  more.dataset.cursor = page.next_cursor || "";
  say(list.children.length === 0 ? `No scope name contains “${q}”.` : `${plural(list.children.length, "scope", "scopes")} found.`);
}

// ---------------------------------------------------------------------------------------
// One scope: details, actions, time travel.

function fact(dl, term, value) {
  dl.append(el("dt", {}, term), el("dd", {}, value));
}

// The action buttons are usable only on a scope the token may manage and that is not revoked.
// A scope whose revocation is pending offers its cancellation instead of pause and resume.
function applyActionButtons(scope) {
  const usable = holds("encryption:manage", scope.path) && scope.effective_state !== "revoked";
  const pending = scope.own_state === "pending_revocation";
  for (const button of $("detail-actions").querySelectorAll("button")) {
    button.disabled = !usable;
    const action = button.dataset.action;
    if (action === "cancel-revocation") button.hidden = !pending;
    if (action === "pause" || action === "resume") button.hidden = pending;
  }
}

// The countdown of this scope's own pending revocation, ticking each second.
let countdownTimer = null;
function showCountdown(scope) {
  clearInterval(countdownTimer);
  const box = $("revocation-countdown");
  const due = scope.own_state === "pending_revocation" ? scope.revocation_due_at : null;
  box.hidden = !due;
  if (!due) return;
  const tick = () => {
    box.textContent = `Revoked for good in ${timeLeft(due)} (at ${formatTime(due)}) unless the revocation is cancelled.`;
  };
  tick();
  countdownTimer = setInterval(tick, 1000);
}

let selectTicket = 0;
let actionTicket = 0;

async function selectScope(id) {
  const ticket = ++selectTicket;
  const scope = await json("GET", `/v1/scopes/${id}`);
  // Clicked another scope meanwhile: that one wins, whatever answers first.
  if (ticket !== selectTicket) return;
  actionTicket++;
  session.selected = scope;
  renderDetail(scope);
  $("detail-panel").hidden = false;
  $("action-form").hidden = true;
  $("detail-panel").focus();
}

function renderDetail(scope) {
  $("detail-title").textContent = `${scope.kind} ${scope.name}`;
  const dl = $("detail-facts");
  dl.replaceChildren();
  fact(dl, "Id", scope.id);
  fact(dl, "Own state", scope.own_state);
  fact(dl, "Effective state", scope.effective_state);
  if (scope.cause) fact(dl, "Why", describeCause(scope));
  const versions = scope.key_versions || [];
  const live = versions.filter((v) => !v.retired).length;
  fact(dl, "Key versions", `${versions.length} (${live} live)`);
  if (scope.rotation_period) fact(dl, "Rotates every", scope.rotation_period);
  fact(dl, "Created", formatTime(scope.created_at));
  const manage = holds("encryption:manage", scope.path);
  const revoked = scope.effective_state === "revoked";
  applyActionButtons(scope);
  showCountdown(scope);
  const note = $("manage-note");
  note.hidden = manage && !revoked;
  note.textContent = revoked
    ? "Revoked for good: no action is possible. Its state and history stay readable."
    : "This token may view this scope but not manage it.";
  $("state-at-result").textContent = "";
}

const ACTIONS = {
  pause: { title: "Pause", submit: "Pause", reasonRequired: true, dryRun: true },
  resume: { title: "Resume", submit: "Resume", reasonRequired: true, dryRun: false },
  rotate: { title: "Rotate the key of", submit: "Rotate key", reasonRequired: true, dryRun: false },
  revoke: { title: "Revoke", submit: "Revoke for good", reasonRequired: true, dryRun: true },
  "cancel-revocation": {
    title: "Cancel the revocation of",
    submit: "Cancel revocation",
    reasonRequired: true,
    dryRun: false,
  },
};

function countsInWords(byKind) {
  const parts = Object.entries(byKind || {})
    .filter(([, n]) => n > 0)
    .map(([kind, n]) => `${n} ${kind}${n === 1 ? "" : "s"}`);
  return parts.length ? parts.join(", ") : "nothing";
}

async function openAction(action) {
  const scope = session.selected;
  const spec = ACTIONS[action];
  const form = $("action-form");
  form.dataset.action = action;
  $("action-title").textContent = `${spec.title} ${scope.kind} ${scope.name}`;
  $("action-submit").textContent = spec.submit;
  $("action-submit").classList.toggle("danger", action === "revoke");
  $("action-reason").value = "";
  $("action-reason").required = spec.reasonRequired;
  $("action-confirm").value = "";
  $("confirm-name").textContent = scope.name;
  $("confirm-field").hidden = action !== "revoke";
  $("revoke-warning").hidden = action !== "revoke";
  // A scope already pending revocation can only be revoked immediately (the emergency path).
  const pending = scope.own_state === "pending_revocation";
  $("revoke-immediately").checked = action === "revoke" && pending;
  $("revoke-immediately").disabled = action === "revoke" && pending;
  $("revoke-window").textContent = action === "revoke" && pending
    ? "Its revocation is already pending: this revokes it now, without waiting."
    : "";
  form.dataset.opener = action;
  const impact = $("action-impact");
  impact.textContent = spec.dryRun ? "Counting what this affects…" : "";
  // Pause and revoke are submitted only once their consequence is on screen.
  $("action-submit").disabled = spec.dryRun;
  form.hidden = false;
  $("action-reason").focus();
  const ticket = ++actionTicket;
  if (spec.dryRun) {
    try {
      const dryBody = action === "revoke" && pending ? { immediately: true } : undefined;
      const dry = await json("POST", `/v1/scopes/${scope.id}/${action}?dry_run=true`, dryBody);
      // Another action or scope was opened meanwhile: this count is not for it.
      if (ticket !== actionTicket) return;
      const becoming = dry.would_become_inactive;
      const already = dry.already_inactive;
      let text = `This affects ${dry.scopes_in_subtree} scope${dry.scopes_in_subtree === 1 ? "" : "s"}. `;
      text += `Would become inactive: ${becoming.total} (${countsInWords(becoming.by_kind)}).`;
      if (already.total > 0) text += ` Already inactive: ${already.total} (${countsInWords(already.by_kind)}).`;
      if (!dry.would_change) text += " Nothing would change.";
      impact.textContent = text;
      if (dry.due_at) {
        $("revoke-window").textContent = `Unless revoked immediately, it is pending until ${formatTime(dry.due_at)}, the organization's waiting period, and can be cancelled until then.`;
      }
      $("action-submit").disabled = false;
    } catch (error) {
      if (ticket !== actionTicket) return;
      impact.textContent = "";
      showError(error, $("action-submit"));
    }
  }
}

async function submitAction() {
  const scope = session.selected;
  const action = $("action-form").dataset.action;
  const spec = ACTIONS[action];
  const reason = $("action-reason").value.trim();
  if (spec.reasonRequired && !reason) {
    throw new Error("Give a reason: it is kept in the audit log.");
  }
  const body = {};
  if (reason) body.reason = reason;
  if (action === "revoke") {
    if ($("action-confirm").value.trim() !== scope.name) {
      $("action-confirm").focus();
      throw new Error(`The name you typed does not match “${scope.name}”. Nothing was revoked.`);
    }
    body.confirm = scope.id;
    if ($("revoke-immediately").checked) body.immediately = true;
  }
  const result = await json("POST", `/v1/scopes/${scope.id}/${action}`, body);
  $("action-form").hidden = true;
  const done = {
    pause: "paused",
    resume: "resumed",
    rotate: "rotated",
    revoke: result.own_state === "pending_revocation" ? "is pending revocation" : "revoked",
    "cancel-revocation": "is no longer pending revocation",
  }[action];
  say(result.changed === false ? `${scope.name}: nothing changed.` : `${scope.name} ${done}. Effective state: ${result.effective_state}.`);
  session.selected = result;
  renderDetail(result);
  await loadTree().catch((error) => showError(error));
  $("detail-panel").focus();
}

async function stateAt() {
  const scope = session.selected;
  const at = toRfc3339($("state-at").value);
  if (!at) throw new Error("Choose a time.");
  const past = await json("GET", `/v1/scopes/${scope.id}/state?at=${encodeURIComponent(at)}`);
  let text = `At ${formatTime(at)}: own state ${past.own_state}, effective state ${past.effective_state}`;
  if (past.cause) text += ` (${describeCause(past)})`;
  $("state-at-result").textContent = `${text}.`;
}

// ---------------------------------------------------------------------------------------
// Master key.

const STEPS = [
  ["credentials", "Credentials found"],
  ["describe", "Key is enabled"],
  ["encrypt", "Wrap a probe with the key"],
  ["decrypt", "Unwrap it again"],
];

async function loadMasterKey() {
  const key = await json("GET", `/v1/orgs/${session.me.org_id}/master-key`);
  const dl = $("mk-facts");
  dl.replaceChildren();
  if (session.org) fact(dl, "Plan", session.org.plan);
  fact(dl, "Tier", key.tier);
  $("tier-select").value = key.tier === "byok" ? "managed" : key.tier;
  fact(dl, "Provider", key.provider === "local" ? "platform key (local)" : key.provider);
  if (key.key_id) fact(dl, "Key", key.key_id);
  if (key.region) fact(dl, "Region", key.region);
  fact(dl, "Health", key.status + (key.reason ? ` (${key.reason})` : ""));
  if (key.detail) fact(dl, "Detail", key.detail);
  if (key.status_since) fact(dl, "Since", formatTime(key.status_since));
  fact(dl, "Last check", key.last_check ? `${formatTime(key.last_check.at)}: ${key.last_check.ok ? "ok" : "failed"}${key.last_check.detail ? ` — ${key.last_check.detail}` : ""}` : "never");
}

async function changeTier() {
  const tier = $("tier-select").value;
  const reason = $("tier-reason").value.trim();
  if (!reason) throw new Error("Give a reason: it is kept in the audit log.");
  const result = await json("PUT", `/v1/orgs/${session.me.org_id}/tier`, { tier, reason });
  session.org = result;
  say(result.changed === false ? `The tier was already ${tier}.` : `Tier changed to ${result.tier}.`);
  $("tier-reason").value = "";
  await loadMasterKey();
}

function showSteps(failure) {
  const list = $("mk-steps");
  list.replaceChildren();
  const failedAt = failure ? STEPS.findIndex(([step]) => step === failure.step) : STEPS.length;
  STEPS.forEach(([step, label], index) => {
    let state = "passed";
    let text = `${label}: passed`;
    if (failure && index === failedAt) {
      state = "failed";
      text = `${label}: failed — ${failure.message || failure.kind}${failure.code ? ` (${failure.code})` : ""}`;
    } else if (failure && (failedAt < 0 || index > failedAt)) {
      state = "skipped";
      text = `${label}: not run`;
    }
    list.append(el("li", { class: `step-${state}`, "data-step": step }, text));
  });
  list.hidden = false;
  const remedy = $("mk-remedy");
  remedy.hidden = !(failure && failure.remedy);
  remedy.textContent = failure && failure.remedy ? `What to do: ${failure.remedy}` : "";
  list.scrollIntoView({ block: "nearest" });
}

async function connectMasterKey() {
  const body = { provider: $("mk-provider").value };
  for (const [id, field] of [["mk-key-id", "key_id"], ["mk-region", "region"], ["mk-endpoint", "endpoint_url"], ["mk-reason", "reason"]]) {
    const value = $(id).value.trim();
    if (value) body[field] = value;
  }
  $("mk-steps").hidden = true;
  $("mk-remedy").hidden = true;
  say("Validating the key…");
  try {
    const result = await json("PUT", `/v1/orgs/${session.me.org_id}/master-key`, body);
    showSteps(null);
    say(result.changed === false ? "The key was already connected." : `Connected. Tier: ${result.tier}.`);
  } catch (error) {
    if (error instanceof ApiProblem && error.problem.provider_error) showSteps(error.problem.provider_error);
    say("");
    throw error;
  }
  await loadMasterKey();
}

// ---------------------------------------------------------------------------------------
// Audit.

function auditQuery() {
  const params = new URLSearchParams();
  const scope = $("audit-scope").value.trim();
  const actor = $("audit-actor").value.trim();
  const action = $("audit-action").value;
  const from = toRfc3339($("audit-from").value);
  const to = toRfc3339($("audit-to").value);
  if (scope) params.set("scope", scope);
  if (actor) params.set("actor", actor);
  if (action) params.set("action", action);
  if (from) params.set("from", from);
  if (to) params.set("to", to);
  return params;
}

async function loadAudit(cursor) {
  const params = auditQuery();
  params.set("limit", String(PAGE));
  if (cursor) params.set("cursor", cursor);
  const page = await json("GET", `/v1/audit?${params}`);
  const rows = $("audit-rows");
  if (!cursor) rows.replaceChildren();
  for (const entry of page.items) {
    rows.append(el("tr", { "data-action": entry.action },
      el("td", {}, String(entry.position)),
      el("td", {}, formatTime(entry.recorded_at)),
      el("td", {}, entry.action),
      el("td", {}, entry.actor),
      el("td", {}, entry.summary || ""),
      el("td", {}, entry.reason || "")));
  }
  const more = $("audit-more");
  more.hidden = !page.next_cursor;
  more.dataset.cursor = page.next_cursor || "";
  say(`${plural(rows.children.length, "audit entry", "audit entries")} shown${page.next_cursor ? " (more available)" : ""}.`);
}

// The token is a header, so a plain link cannot download: fetch, then save the Blob.
async function exportAudit(format) {
  const params = auditQuery();
  params.set("format", format);
  await download(`/v1/audit/export?${params}`, "ekm-audit", format);
}

async function verifyAudit() {
  const report = await json("GET", "/v1/audit/verify");
  const result = $("verify-result");
  result.hidden = false;
  const access = report.access_log;
  const accessText = access
    ? (access.ok
      ? ` Access log intact: ${plural(access.records, "record", "records")} in ${plural(access.streams, "stream", "streams")}.`
      : ` Access log broken at record ${access.first_failure.id}: ${access.first_failure.problem}.`)
    : "";
  const failure = report.first_failure;
  if (report.ok) {
    result.className = "ok";
    result.textContent = `Hash chain intact: ${report.entries} entries verified, head position ${report.head_position}, head hash ${report.head_hash}. Keep the head hash elsewhere to detect a rewrite of the whole chain.${accessText}`;
  } else if (failure) {
    result.className = "error";
    result.textContent = `Hash chain broken at position ${failure.position}: entry ${failure.problem}${failure.detail ? ` (${failure.detail})` : ""}.${accessText}`;
  } else {
    result.className = "error";
    result.textContent = `Verification failed.${accessText}`;
  }
}

// Access log and "who could decrypt".

function accessQuery() {
  const params = new URLSearchParams();
  const scope = $("access-scope").value.trim();
  const principal = $("access-principal").value.trim();
  const operation = $("access-operation").value;
  const outcome = $("access-outcome").value.trim();
  const from = toRfc3339($("access-from").value);
  const to = toRfc3339($("access-to").value);
  if (scope) params.set("scope", scope);
  if (principal) params.set("principal", principal);
  if (operation) params.set("operation", operation);
  if (outcome) params.set("outcome", outcome);
  if (from) params.set("from", from);
  if (to) params.set("to", to);
  return params;
}

async function loadAccess(cursor) {
  const params = accessQuery();
  params.set("limit", String(PAGE));
  if (cursor) params.set("cursor", cursor);
  const page = await json("GET", `/v1/audit/access?${params}`);
  const rows = $("access-rows");
  if (!cursor) rows.replaceChildren();
  for (const use of page.items) {
    rows.append(el("tr", { "data-operation": use.operation, "data-outcome": use.outcome },
      el("td", {}, formatTime(use.at)),
      el("td", {}, use.scope_id),
      el("td", {}, use.principal),
      el("td", {}, use.operation),
      el("td", {}, use.class || ""),
      el("td", {}, use.key_version == null ? "" : String(use.key_version)),
      el("td", {}, use.outcome),
      el("td", {}, use.justification || "")));
  }
  const more = $("access-more");
  more.hidden = !page.next_cursor;
  more.dataset.cursor = page.next_cursor || "";
  say(`${plural(rows.children.length, "use", "uses")} shown${page.next_cursor ? " (more available)" : ""}.`);
}

async function download(path, name, format) {
  // A long log streams for a while: allow ten minutes, not the usual thirty seconds.
  const response = await api("GET", path, undefined, 10 * 60_000);
  if (!response.ok) {
    let problem = null;
    try { problem = await response.json(); } catch (_) { problem = null; }
    throw new ApiProblem(response.status, problem);
  }
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: `${name}.${format}` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  say(`Exported ${format.toUpperCase()} (${blob.size} bytes).`);
}

async function exportAccess() {
  const params = accessQuery();
  params.set("format", "csv");
  await download(`/v1/audit/access/export?${params}`, "ekm-access", "csv");
}

async function whoCould() {
  const scope = $("who-could-scope").value.trim();
  const at = toRfc3339($("who-could-at").value);
  if (!scope) throw new Error("Give a scope id.");
  if (!at) throw new Error("Choose a time.");
  const answer = await json("GET", `/v1/scopes/${encodeURIComponent(scope)}/access-at?at=${encodeURIComponent(at)}`);
  const result = $("who-could-result");
  const heading = el("p", {}, `At ${formatTime(at)} the scope was ${answer.effective_state}.`);
  if (answer.principals.length === 0) {
    const why = answer.effective_state === "active"
      ? "No principal held a data:use grant covering it."
      : `Nobody could decrypt${answer.cause ? ` (${describeCause(answer)})` : ""}.`;
    result.replaceChildren(heading, el("p", { id: "who-could-nobody" }, why));
    return;
  }
  const list = el("ul", { id: "who-could-list" });
  for (const p of answer.principals) {
    const tokens = p.tokens.length === 0
      ? "no valid token"
      : p.tokens.map((t) => `${t.token_id}${t.expires_at ? ` (expires ${formatTime(t.expires_at)})` : ""}`).join(", ");
    const until = p.grant_expires_at ? ` until ${formatTime(p.grant_expires_at)}` : "";
    list.append(el("li", {}, `${p.principal}: ${p.permission} granted on ${p.granted_on}${until}; tokens: ${tokens}`));
  }
  result.replaceChildren(heading, list);
}

// ---------------------------------------------------------------------------------------
// Wiring.

function on(id, event, handler) {
  $(id).addEventListener(event, handler);
}

function wire() {
  on("signin-form", "submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) {
      showError("Paste a token first.", $("signin-button"));
      return;
    }
    busy($("signin-button"), () => signIn(token));
  });
  on("sign-out", "click", () => signOut());
  for (const button of document.querySelectorAll("[data-view]")) {
    button.addEventListener("click", () => showView(button.dataset.view));
  }
  on("search-form", "submit", (event) => {
    event.preventDefault();
    busy($("search-button"), () => search());
  });
  on("search-more", "click", () => busy($("search-more"), () => search($("search-more").dataset.cursor)));
  on("search-clear", "click", () => {
    $("search-results").hidden = true;
    $("tree-panel").hidden = false;
    $("search-q").value = "";
    say("");
  });
  for (const button of $("detail-actions").querySelectorAll("button")) {
    button.addEventListener("click", () => busy(button, () => openAction(button.dataset.action)));
  }
  on("action-form", "submit", (event) => {
    event.preventDefault();
    busy($("action-submit"), submitAction);
  });
  on("action-cancel", "click", () => {
    const form = $("action-form");
    form.hidden = true;
    actionTicket++;
    // Back to the button that opened the form.
    const opener = [...$("detail-actions").querySelectorAll("button")].find(
      (b) => b.dataset.action === form.dataset.opener,
    );
    if (opener && !opener.disabled) opener.focus();
    else $("detail-panel").focus();
  });
  on("pause-instead", "click", () => busy($("pause-instead"), () => openAction("pause")));
  on("state-at-form", "submit", (event) => {
    event.preventDefault();
    busy($("state-at-button"), stateAt);
  });
  on("mk-refresh", "click", () => busy($("mk-refresh"), loadMasterKey));
  on("tier-form", "submit", (event) => {
    event.preventDefault();
    busy($("tier-submit"), changeTier);
  });
  on("mk-form", "submit", (event) => {
    event.preventDefault();
    busy($("mk-submit"), connectMasterKey);
  });
  on("audit-form", "submit", (event) => {
    event.preventDefault();
    busy($("audit-apply"), () => loadAudit());
  });
  on("audit-more", "click", () => busy($("audit-more"), () => loadAudit($("audit-more").dataset.cursor)));
  on("audit-use-selected", "click", () => {
    if (session.selected) $("audit-scope").value = session.selected.id;
    else showError("Select a scope in the Scopes view first.", $("audit-use-selected"));
  });
  on("audit-export-jsonl", "click", () => busy($("audit-export-jsonl"), () => exportAudit("jsonl")));
  on("audit-export-csv", "click", () => busy($("audit-export-csv"), () => exportAudit("csv")));
  on("audit-verify", "click", () => busy($("audit-verify"), verifyAudit));
  on("access-form", "submit", (event) => {
    event.preventDefault();
    busy($("access-apply"), () => loadAccess());
  });
  on("access-more", "click", () => busy($("access-more"), () => loadAccess($("access-more").dataset.cursor)));
  on("access-use-selected", "click", () => {
    if (session.selected) $("access-scope").value = session.selected.id;
    else showError("Select a scope in the Scopes view first.", $("access-use-selected"));
  });
  on("access-export-csv", "click", () => busy($("access-export-csv"), exportAccess));
  on("who-could-form", "submit", (event) => {
    event.preventDefault();
    busy($("who-could-submit"), whoCould);
  });
  on("who-could-use-selected", "click", () => {
    if (session.selected) $("who-could-scope").value = session.selected.id;
    else showError("Select a scope in the Scopes view first.", $("who-could-use-selected"));
  });
  // Only now can the form be submitted without the page sending the token anywhere.
  $("signin-button").disabled = false;
}

wire();
const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) {
  busy($("signin-button"), () => signIn(saved));
}
document.body.dataset.ready = "true";
