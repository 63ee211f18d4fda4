// The mediatag dashboard: the gateway's JSON API and its Server-Sent Events, no framework.
// Every string from the services (filenames, owners, tags, errors) is set as text, never
// parsed as HTML; the Content-Security-Policy allows no inline script either.
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const PREFIX = "PROCESSING_STATUS_";
  const UPLOADS_AT_ONCE = 3;
  const LIST_SIZE = 100;
  const DEAD = "WEBHOOK_DELIVERY_STATE_DEAD";
  const DELIVERIES_SHOWN = 50;
  // Reloads after a reset, the first at once: one reset again (a log compacted faster than
  // the page reads it, or a gateway that cannot serve the revision) waits longer each time
  // instead of reloading in a loop.
  const RESET_DELAYS_MS = [0, 1000, 2000, 5000, 10000, 30000];
  const state = {
    csrf: "",
    principal: null,
    canAct: true,
    isAdmin: true,
    listOwner: "",
    listStatus: "",
    items: new Map(), // media id -> {media, revision, row}
    waiting: new Map(), // media id -> changes that came before the item was fetched
    uploads: new Map(), // media id -> list entry of an upload
    source: null,
    chart: null,
    timers: [],
    resets: 0, // resets in a row, until a stream delivers something
    reload: null, // the timer of the reload after a reset
    loads: 0, // which call of loadItems is the latest: an older one stops where it is
  };

  // ---- building the page, as text only ----

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (name === "dataset") Object.assign(node.dataset, value);
      else if (name === "className") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function notice(text) {
    const box = $("notice");
    box.textContent = text;
    box.hidden = !text;
  }

  const statusName = (status) => (status || "").replace(PREFIX, "").toLowerCase();

  function badge(status) {
    const name = statusName(status);
    return el("span", { className: `badge status-${name}` }, name.replace("_", " "));
  }

  function when(timestamp) {
    return timestamp ? new Date(timestamp).toLocaleTimeString() : "";
  }

  function seconds(duration) {
    // A protobuf Duration in JSON: "12.500s".
    if (!duration) return "–";
    const value = parseFloat(duration);
    if (value < 60) return `${value.toFixed(1)} s`;
    if (value < 3600) return `${(value / 60).toFixed(1)} min`;
    return `${(value / 3600).toFixed(1)} h`;
  }

  // ---- calling the gateway ----

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || `HTTP ${status}`);
      this.status = status;
      const info = ((body && body.details) || []).find((d) => d["@type"].endsWith("ErrorInfo"));
      this.reason = info ? info.reason : "";
    }
  }

  async function api(method, path, body) {
    const headers = {};
    let payload;
    if (method !== "GET") headers["X-CSRF-Token"] = state.csrf;
    if (body instanceof FormData) {
      payload = body;
    } else if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    const response = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
    const text = await response.text();
    const answer = text ? JSON.parse(text) : null;
    if (!response.ok) throw new ApiError(response.status, answer);
    return answer;
  }

  async function act(what, method, path, body) {
    try {
      const answer = await api(method, path, body);
      notice("");
      return answer;
    } catch (error) {
      notice(`${what}: ${error.message}${error.reason ? ` (${error.reason})` : ""}`);
      if (error.status === 401) showSignIn();
      return null;
    }
  }

  // ---- signing in ----

  function showSignIn() {
    closeEvents();
    clearTimeout(state.reload);
    for (const timer of state.timers) clearInterval(timer);
    state.timers = [];
    $("dashboard").hidden = true;
    $("sign-in").hidden = false;
    $("sign-out").hidden = true;
    $("who").textContent = "";
  }

  function useSession(session) {
    state.csrf = session.csrfToken;
    state.principal = session.principal || null;
    const roles = state.principal ? state.principal.roles : ["admin"];
    state.canAct = roles.includes("admin") || roles.includes("uploader");
    state.isAdmin = roles.includes("admin");
    for (const node of document.querySelectorAll(".act")) node.hidden = !state.canAct;
    for (const node of document.querySelectorAll(".admin")) node.hidden = !state.isAdmin;
    if (state.principal) {
      const owners = state.principal.owners ? ` · owners ${state.principal.owners.join(", ")}` : "";
      $("who").textContent = `${state.principal.name} (${roles.join(", ")})${owners}`;
    }
    $("sign-out").hidden = !session.authentication;
    $("sign-in").hidden = true;
    $("dashboard").hidden = false;
  }

  async function start() {
    let session;
    try {
      session = await api("GET", "/api/v1/session");
    } catch (error) {
      if (error.status === 401) return showSignIn();
      return notice(`The gateway cannot be reached: ${error.message}`);
    }
    useSession(session);
    for (const timer of state.timers) clearInterval(timer);
    refreshQueue();
    refreshThroughput();
    refreshDeliveries();
    state.timers = [
      setInterval(refreshQueue, 2000),
      setInterval(refreshThroughput, 5000),
      setInterval(refreshDeliveries, 5000),
    ];
    await loadItems();
    route();
  }

  $("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = $("token").value;
    const session = await act("Sign in", "POST", "/api/v1/session", { token });
    $("token").value = "";
    if (session) start();
  });

  $("sign-out").addEventListener("click", async () => {
    await act("Sign out", "DELETE", "/api/v1/session");
    showSignIn();
  });

  // ---- the queue at a glance ----

  async function refreshQueue() {
    let status;
    try {
      status = await api("GET", "/api/v1/queue");
    } catch (error) {
      if (error.status === 401) showSignIn();
      return;
    }
    const counts = Object.fromEntries(status.counts.map((c) => [statusName(c.status), c.count]));
    for (const name of ["pending", "processing", "completed", "failed"]) {
      $(`count-${name}`).textContent = counts[name] || "0";
    }
    $("workers").textContent = `${status.workersBusy} / ${status.workersTotal}`;
    $("wait").textContent = seconds(status.estimatedWait);
    $("paused").textContent = status.paused ? "paused" : "running";
    $("paused").className = status.paused ? "value paused" : "value";
    if (state.isAdmin) {
      $("pause").hidden = status.paused;
      $("resume").hidden = !status.paused;
    }
    const rows = status.rateLimits.map((limit) => {
      const until = limit.throttledUntil && new Date(limit.throttledUntil) > new Date();
      return el(
        "tr",
        {},
        el("td", {}, limit.api),
        el("td", {}, `${limit.ratePerSecond}/s, burst ${limit.burst}`),
        el("td", {}, `${Math.round(limit.currentUse * 100)} %`),
        el("td", {}, until ? `until ${when(limit.throttledUntil)}` : "–"),
        el("td", {}, limit.quotaErrors),
      );
    });
    $("limits").tBodies[0].replaceChildren(...rows);
    const replicas = (status.replicas || []).map((replica) =>
      el(
        "tr",
        {},
        el("td", {}, replica.replicaId),
        el("td", {}, `${replica.host} (${replica.pid})`),
        el("td", {}, `${replica.workersBusy || 0} / ${replica.workersTotal || 0}`),
        el("td", {}, when(replica.lastSeenTime)),
        el("td", {}, replica.state === "REPLICA_STATE_GONE" ? "gone" : "live"),
      ),
    );
    $("replicas").tBodies[0].replaceChildren(...replicas);
  }

  $("pause").addEventListener("click", async () => {
    if (await act("Pause", "POST", "/api/v1/queue:pause")) refreshQueue();
  });
  $("resume").addEventListener("click", async () => {
    if (await act("Resume", "POST", "/api/v1/queue:resume")) refreshQueue();
  });

  async function refreshThroughput() {
    let recorded;
    try {
      recorded = await api("GET", "/api/v1/throughput");
    } catch (error) {
      return;
    }
    const data = [
      recorded.minutes.map((m) => m.startTime),
      recorded.minutes.map((m) => m.completed),
      recorded.minutes.map((m) => m.failed),
    ];
    $("chart-since").textContent = `(counted since ${new Date(recorded.since * 1000).toLocaleTimeString()})`;
    if (!window.uPlot) return;
    if (state.chart) return state.chart.setData(data);
    const width = Math.max(300, $("chart-plot").clientWidth || 600);
    state.chart = new window.uPlot(
      {
        width,
        height: 180,
        series: [
          {},
          { label: "completed", stroke: "#2e7d32", fill: "rgba(46,125,50,0.15)" },
          { label: "failed", stroke: "#c62828", fill: "rgba(198,40,40,0.15)" },
        ],
        axes: [{}, { label: "per minute" }],
      },
      data,
      $("chart-plot"),
    );
  }

  // ---- webhook deliveries out of retries ----

  function adminButton(label, onClick) {
    const button = el("button", { type: "button", className: "admin" }, label);
    button.hidden = !state.isAdmin;
    button.addEventListener("click", onClick);
    return button;
  }

  async function refreshDeliveries() {
    const params = new URLSearchParams({ state: DEAD, page_size: String(DELIVERIES_SHOWN) });
    let listed;
    try {
      listed = await api("GET", `/api/v1/webhookDeliveries?${params}`);
    } catch (error) {
      // A role that may not list them (uploader) gets no panel.
      $("dead-deliveries").hidden = true;
      return;
    }
    const deliveries = listed.deliveries;
    $("dead-deliveries").hidden = deliveries.length === 0;
    const rows = deliveries.map((delivery) =>
      el(
        "tr",
        { dataset: { deliveryId: delivery.id } },
        el("td", {}, delivery.endpoint),
        el("td", {}, el("a", { href: `#/media/${encodeURIComponent(delivery.mediaId)}` }, delivery.mediaId)),
        el("td", {}, delivery.ownerId),
        el("td", {}, badge(delivery.status)),
        el("td", { className: "attempts" }, delivery.attempts),
        el("td", { className: "error" }, delivery.lastError),
        el("td", {}, delivery.deadTime ? new Date(delivery.deadTime).toLocaleString() : ""),
        el(
          "td",
          {},
          adminButton("Retry", () => retryDeliveries("Retry", { deliveryIds: [delivery.id] })),
        ),
      ),
    );
    $("deliveries").tBodies[0].replaceChildren(...rows);
    const endpoints = [...new Set(deliveries.map((delivery) => delivery.endpoint))];
    $("deliveries-actions").replaceChildren(
      ...endpoints.map((endpoint) =>
        adminButton(`Retry every dead to ${endpoint}`, () =>
          retryDeliveries(`Retry every dead to ${endpoint}`, { endpoint }),
        ),
      ),
    );
    $("deliveries-hint").textContent = listed.nextPageToken ? `(the ${DELIVERIES_SHOWN} newest)` : "";
  }

  async function retryDeliveries(what, body) {
    const answer = await act(what, "POST", "/api/v1/webhookDeliveries:retry", body);
    if (answer) notice(`${answer.count} webhook delivery(ies) sent again`);
    refreshDeliveries();
  }

  // ---- the list of items, live ----

  function chosenOwner() {
    const owner = $("owner").value.trim();
    const owners = state.principal && state.principal.owners;
    return owner || (owners && owners.length === 1 ? owners[0] : "");
  }

  function detail(media) {
    if (media.status === `${PREFIX}FAILED` && media.error) {
      return el("span", { className: "error" }, `${media.error.reason}: ${media.error.message}`);
    }
    if (media.status === `${PREFIX}NOT_APPLICABLE`) return media.notApplicableReason || "";
    return (media.tags || []).join(", ");
  }

  function renderRow(item) {
    const media = item.media;
    const link = el("a", { href: `#/media/${encodeURIComponent(media.id)}` }, media.filename || media.id);
    const thumb =
      media.kind === "MEDIA_KIND_IMAGE"
        ? el("img", { src: contentUrl(media.id), alt: "", loading: "lazy", className: "thumb" })
        : el("span", { className: "muted" }, statusName(media.kind.replace("MEDIA_KIND_", PREFIX)));
    const retry = el("button", { type: "button", className: "retry" }, "Retry");
    retry.hidden = !(state.canAct && media.status === `${PREFIX}FAILED`);
    retry.addEventListener("click", () => retryItems([media.id]));
    const row = el(
      "tr",
      { dataset: { mediaId: media.id } },
      el("td", {}, thumb),
      el("td", {}, media.ownerId),
      el("td", {}, link),
      el("td", { className: "status" }, badge(media.status)),
      el("td", { className: "attempt" }, media.attempt || 0),
      el("td", { className: "detail" }, detail(media)),
      el("td", {}, retry),
    );
    if (item.row) item.row.replaceWith(row);
    item.row = row;
    const upload = state.uploads.get(media.id);
    if (upload) upload.querySelector(".status").replaceChildren(badge(media.status));
    return row;
  }

  function contentUrl(id) {
    return `/api/v1/media/${encodeURIComponent(id)}/content`;
  }

  function show(media, where) {
    const shown = state.items.get(media.id);
    if (shown) {
      // On the list already (an upload's answer and a listing of the same moment): one row,
      // at the newer revision.
      const revision = Number(media.statusRevision || 0);
      if (revision > shown.revision) {
        shown.media = media;
        shown.revision = revision;
        renderRow(shown);
      }
      return;
    }
    const item = { media, revision: Number(media.statusRevision || 0), row: null };
    state.items.set(media.id, item);
    const body = $("items").tBodies[0];
    const row = renderRow(item);
    if (where === "top") body.prepend(row);
    else body.append(row);
    while (body.rows.length > LIST_SIZE) {
      const last = body.rows[body.rows.length - 1];
      state.items.delete(last.dataset.mediaId);
      last.remove();
    }
    for (const change of state.waiting.get(media.id) || []) apply(item, change);
    state.waiting.delete(media.id);
  }

  function apply(item, response) {
    const revision = Number(response.revision);
    if (revision <= item.revision) return;
    const change = response.change;
    item.revision = revision;
    Object.assign(item.media, {
      status: change.status,
      attempt: change.attempt,
      tags: change.result ? change.result.tags : item.media.tags,
      error: change.error && change.error.reason ? { ...change.error, attempt: change.attempt } : null,
    });
    renderRow(item);
  }

  async function onChange(response) {
    const change = response.change;
    const item = state.items.get(change.mediaId);
    if (item) {
      apply(item, response);
      if (currentItemId() === change.mediaId) showItem(change.mediaId);
      return;
    }
    if (state.listStatus && change.status !== state.listStatus) return;
    const waiting = state.waiting.get(change.mediaId);
    if (waiting) return waiting.push(response);
    state.waiting.set(change.mediaId, [response]);
    try {
      const answer = await api("GET", `/api/v1/media/${encodeURIComponent(change.mediaId)}`);
      if (!state.items.has(change.mediaId)) show(answer.media, "top");
    } catch (error) {
      state.waiting.delete(change.mediaId);
    }
  }

  function setConnected(connected) {
    $("connection").textContent = connected ? "live" : "reconnecting…";
    $("connection").className = connected ? "live" : "muted";
  }

  function closeEvents() {
    if (state.source) state.source.close();
    state.source = null;
  }

  function openEvents(owner, after) {
    closeEvents();
    const params = new URLSearchParams();
    if (owner) params.set("owner_id", owner);
    if (after) params.set("start_revision", String(after));
    const source = new EventSource(`/api/v1/events?${params}`);
    state.source = source;
    source.addEventListener("open", () => setConnected(true));
    source.addEventListener("change", (event) => {
      state.resets = 0;
      onChange(JSON.parse(event.data));
    });
    source.addEventListener("bookmark", () => {
      state.resets = 0;
      setConnected(true);
    });
    // The revision to resume from is gone: start over from the current state, watching
    // from the revision the gateway says is current (the listed items' may be the lost one
    // again). Closed first: the EventSource would reconnect with the lost id.
    source.addEventListener("reset", (event) => {
      closeEvents();
      setConnected(false);
      reloadAfterReset(currentRevisionOf(JSON.parse(event.data)));
    });
    source.addEventListener("ended", (event) => notice(JSON.parse(event.data).message));
    source.addEventListener("error", () => {
      setConnected(false);
      // The browser reconnects by itself (with Last-Event-ID) unless the gateway refused.
      if (source.readyState === EventSource.CLOSED && state.source === source) {
        setTimeout(() => state.source === source && start(), 3000);
      }
    });
  }

  function currentRevisionOf(status) {
    const info = ((status && status.details) || []).find((d) => d["@type"].endsWith("ErrorInfo"));
    return Number((info && info.metadata && info.metadata.currentRevision) || 0);
  }

  function reloadAfterReset(current) {
    const delay = RESET_DELAYS_MS[Math.min(state.resets, RESET_DELAYS_MS.length - 1)];
    state.resets += 1;
    clearTimeout(state.reload);
    // Jittered, so that pages reset together (a replaced log) do not come back together.
    state.reload = setTimeout(() => loadItems(current), delay * (0.5 + Math.random()));
  }

  // The list, then its changes; ``current``: the current revision a reset gave, to watch
  // from.
  async function loadItems(current = 0) {
    clearTimeout(state.reload);
    closeEvents();
    // Not live until the new list's stream is open.
    setConnected(false);
    const load = ++state.loads;
    state.listOwner = chosenOwner();
    state.listStatus = $("status").value;
    state.items.clear();
    state.waiting.clear();
    $("items").tBodies[0].replaceChildren();
    $("drop").hidden = !state.canAct || !state.listOwner;
    // The revision to watch from: the one a reset gave as current, or the current one read
    // before listing (not after: a change in between would be in neither).
    let after = current;
    if (!after) {
      const queue = await act("Queue", "GET", "/api/v1/queue");
      if (load !== state.loads) return;
      after = queue ? Number(queue.currentRevision) : 0;
    }
    let listedRevision = 0;
    // Without an owner, the most recent items of every owner, for a principal that may see
    // every owner; one restricted to several owners must choose one.
    const everyOwner = !state.listOwner && !(state.principal && state.principal.owners);
    if (state.listOwner || everyOwner) {
      const params = new URLSearchParams({ page_size: String(LIST_SIZE) });
      if (state.listOwner) params.set("owner_id", state.listOwner);
      if (state.listStatus) params.set("status", state.listStatus);
      const listed = await act("List", "GET", `/api/v1/media?${params}`);
      if (load !== state.loads) return;
      for (const media of (listed && listed.media) || []) {
        show(media, "end");
        listedRevision = Math.max(listedRevision, Number(media.statusRevision || 0));
      }
      $("list-hint").textContent = everyOwner
        ? "Every owner: the most recent items, and others as they change. Choose an owner to upload."
        : "";
    } else {
      $("list-hint").textContent =
        "Your owners: items appear here as they change. Choose an owner to list (and upload) its items.";
    }
    // Rather the listed items' latest revision, when there is one: the list can lag the
    // current revision by what the ingest service has still to apply, and watching from its
    // own revision misses none of that. Not after a reset: it may be the revision just lost.
    if (!current && listedRevision) after = listedRevision;
    openEvents(state.listOwner, after);
  }

  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = "#/";
    state.resets = 0;
    loadItems();
  });

  async function retryItems(mediaIds) {
    const answer = await act("Retry", "POST", "/api/v1/media:reprocess", { mediaIds });
    if (answer) notice("");
  }

  $("retry-failed").addEventListener("click", async () => {
    const answer = await act("Retry every failed", "POST", "/api/v1/media:reprocess", {
      ownerId: state.listOwner,
      status: `${PREFIX}FAILED`,
    });
    if (answer) notice(`${answer.count} item(s) sent back to analysis`);
  });

  // ---- uploads: drop files, watch them go through ----

  async function uploadOne(file) {
    const entry = el("li", {}, el("span", { className: "name" }, file.name), " ", el("span", { className: "status" }, "uploading…"));
    $("uploads").prepend(entry);
    const form = new FormData();
    form.append("owner_id", state.listOwner);
    const category = $("category").value.trim();
    if (category) form.append("category", category);
    form.append("files", file, file.name);
    try {
      const answer = await api("POST", "/api/v1/media", form);
      const media = answer.media[0];
      state.uploads.set(media.id, entry);
      entry.dataset.mediaId = media.id;
      if (state.items.has(media.id)) renderRow(state.items.get(media.id));
      else show(media, "top");
    } catch (error) {
      entry.querySelector(".status").textContent = `refused: ${error.message}`;
      entry.classList.add("error");
    }
  }

  async function uploadFiles(files) {
    const queue = Array.from(files);
    const worker = async () => {
      while (queue.length) await uploadOne(queue.shift());
    };
    await Promise.all(Array.from({ length: UPLOADS_AT_ONCE }, worker));
  }

  $("files").addEventListener("change", () => {
    uploadFiles($("files").files);
    $("files").value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    uploadFiles(event.dataTransfer.files);
  });

  // ---- one item's page ----

  function currentItemId() {
    const match = location.hash.match(/^#\/media\/(.+)$/);
    return match ? decodeURIComponent(match[1]) : null;
  }

  async function showItem(mediaId) {
    const [media, job] = await Promise.all([
      act("Item", "GET", `/api/v1/media/${encodeURIComponent(mediaId)}`),
      api("GET", `/api/v1/jobs/${encodeURIComponent(mediaId)}`).catch(() => null),
    ]);
    if (!media || currentItemId() !== mediaId) return;
    const item = media.media;
    $("item-title").textContent = item.filename || item.id;
    const summary = [
      el("p", {}, "id ", el("code", {}, item.id), " · owner ", item.ownerId, " · ", badge(item.status)),
      el("p", { className: "detail" }, detail(item)),
    ];
    if (item.kind === "MEDIA_KIND_IMAGE") summary.unshift(el("img", { src: contentUrl(item.id), alt: "", className: "large" }));
    $("item-summary").replaceChildren(...summary);
    $("item-retry").hidden = !(state.canAct && item.status === `${PREFIX}FAILED`);
    const attempts = ((job && job.job.attempts) || []).map((attempt) =>
      el(
        "tr",
        {},
        el("td", {}, attempt.number),
        el("td", {}, when(attempt.startTime)),
        el("td", {}, when(attempt.endTime)),
        el("td", {}, attempt.outcome),
        el("td", {}, attempt.error ? attempt.error.reason : ""),
        el("td", {}, attempt.error ? attempt.error.message : ""),
      ),
    );
    $("attempts").tBodies[0].replaceChildren(...attempts);
  }

  $("item-retry").addEventListener("click", () => {
    const mediaId = currentItemId();
    if (mediaId) retryItems([mediaId]);
  });

  function route() {
    const mediaId = currentItemId();
    $("items-view").hidden = Boolean(mediaId);
    $("item-view").hidden = !mediaId;
    if (mediaId) showItem(mediaId);
  }

  window.addEventListener("hashchange", route);
  start();
})();
