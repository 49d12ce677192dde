// The approvals console: poll the state, render it as text (never as HTML), post decisions.
"use strict";

const POLL_MS = 2000;
let csrf = null;
let skew = 0; // the server's clock minus this browser's, in seconds

const byId = (id) => document.getElementById(id);

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text == null || text === "" ? "—" : String(text);
  if (className) td.className = className;
  return td;
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function clock(unixSeconds) {
  return unixSeconds ? new Date(unixSeconds * 1000).toISOString().slice(0, 19).replace("T", " ") : "";
}

function now() {
  return Date.now() / 1000 + skew;
}

function say(text, failed) {
  const box = byId("message");
  box.textContent = text;
  box.className = failed ? "failed" : "";
  box.hidden = false;
}

async function decide(id, verb, reason) {
  const headers = { "Content-Type": "application/json" };
  if (csrf) headers["X-CSRF-Token"] = csrf;
  const resp = await fetch(`api/approvals/${encodeURIComponent(id)}/${verb}`, {
    method: "POST",
    headers,
    body: JSON.stringify({ reason }),
    credentials: "same-origin",
  });
  const body = await resp.json().catch(() => ({}));
  if (resp.ok) say(`${id} ${verb === "approve" ? "approved" : "rejected"}.`, false);
  else say(`${id}: ${body.error || `HTTP ${resp.status}`}`, true);
  await poll();
}

function decisionCell(a) {
  const td = document.createElement("td");
  td.className = "decision";
  const approve = document.createElement("button");
  approve.type = "button";
  approve.className = "approve";
  approve.textContent = "Approve";
  approve.addEventListener("click", () => decide(a.id, "approve", ""));
  const form = document.createElement("form");
  const reason = document.createElement("input");
  reason.name = "reason";
  reason.required = true;
  reason.maxLength = 500;
  reason.placeholder = "reason for rejecting";
  const reject = document.createElement("button");
  reject.type = "submit";
  reject.className = "reject";
  reject.textContent = "Reject";
  form.append(reason, reject);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    decide(a.id, "reject", reason.value.trim());
  });
  td.append(approve, " ", form);
  return td;
}

// Pending rows are updated in place, so a reason being typed survives each poll.
function renderPending(pending) {
  const body = byId("pending").tBodies[0];
  const wanted = new Set(pending.map((a) => a.id));
  for (const row of [...body.rows]) if (!wanted.has(row.dataset.approvalId)) row.remove();
  for (const a of pending) {
    let row = [...body.rows].find((r) => r.dataset.approvalId === a.id);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.approvalId = a.id;
      const digest = cell(a.arguments_sha256, "mono digest");
      digest.title = a.arguments_sha256;
      row.append(
        cell(a.id, "mono"),
        cell(a.server ? `${a.server}/${a.tool}` : a.tool),
        cell(a.caller_set || a.grant, "mono"),
        cell(a.argument_names.join(", "), "mono"),
        digest,
        cell("", "age"),
        cell("", "expires"),
        cell(a.notify),
        decisionCell(a),
      );
      body.append(row);
    }
    row.querySelector(".age").textContent = duration(now() - a.created_at);
    row.querySelector(".expires").textContent = duration(a.expires_at - now());
  }
  byId("pending-count").textContent = pending.length ? `(${pending.length})` : "";
  byId("pending-empty").hidden = pending.length > 0;
}

function renderDecided(decided) {
  const rows = decided.map((a) => {
    const row = document.createElement("tr");
    row.dataset.approvalId = a.id;
    row.append(
      cell(a.id, "mono"),
      cell(a.server ? `${a.server}/${a.tool}` : a.tool),
      cell(a.caller_set || a.grant, "mono"),
      cell(a.state, `state-${a.state}`),
      cell(a.operator),
      cell(clock(a.decided_at)),
      cell(a.reason),
      cell(a.uses_left),
      cell(duration(a.expires_at - now())),
    );
    return row;
  });
  byId("decided").tBodies[0].replaceChildren(...rows);
  byId("decided-empty").hidden = rows.length > 0;
}

function renderDenials(denials, capacity) {
  const rows = denials.map((d) => {
    const row = document.createElement("tr");
    row.append(
      cell(d.time ? d.time.replace("T", " ").replace("Z", "") : ""),
      cell(d.server ? `${d.server}/${d.tool || d.method}` : d.tool || d.method),
      cell(d.reason, "mono"),
      cell(d.decision === "dry_run_deny" ? "dry run (allowed)" : "denied"),
      cell(d.caller_set || d.grant, "mono"),
      cell(d.request_id, "mono"),
      cell(d.reason_text),
    );
    return row;
  });
  byId("denials").tBodies[0].replaceChildren(...rows);
  byId("denials-empty").hidden = rows.length > 0;
  byId("denials-note").textContent = `(the last ${capacity} of this process)`;
}

async function poll() {
  let resp;
  try {
    resp = await fetch("api/state", { credentials: "same-origin", cache: "no-store" });
  } catch (err) {
    byId("status").textContent = "mcp-authz is not answering; retrying…";
    return;
  }
  if (resp.status === 401) {
    window.location.reload(); // the session ended: the server answers with the sign-in form
    return;
  }
  if (!resp.ok) {
    byId("status").textContent = `mcp-authz answered HTTP ${resp.status}; retrying…`;
    return;
  }
  const state = await resp.json();
  csrf = state.csrf;
  skew = state.now - Date.now() / 1000;
  byId("status").textContent = `Signed in as ${state.operator} · updated ${clock(state.now)} UTC`;
  const storeError = byId("store-error");
  storeError.textContent = state.approvals_error || "";
  storeError.hidden = !state.approvals_error;
  // Without the store nothing can be decided: show no stale rows (the banner says why).
  const approvals = state.approvals || [];
  renderPending(approvals.filter((a) => a.state === "pending"));
  renderDecided(approvals.filter((a) => a.state !== "pending").reverse());
  if (!state.approvals) byId("pending-empty").hidden = byId("decided-empty").hidden = true;
  renderDenials(state.denials, state.denials_capacity);
}

async function signOut() {
  const headers = csrf ? { "X-CSRF-Token": csrf } : {};
  await fetch("logout", { method: "POST", headers, credentials: "same-origin" });
  window.location.reload();
}

byId("logout").addEventListener("click", signOut);
poll();
setInterval(poll, POLL_MS);
