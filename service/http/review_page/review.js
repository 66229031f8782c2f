/* The review page (issue 26; docs/review.md): the queue of recorded NG (and sampled OK) images from
   GET /v1/review/queue, the selected image at full resolution in a canvas with its boxes, and the decisions, each a
   POST /v1/inspections/{request_id}/images/{index}/review (undo: DELETE).

   Safety: every string from the server reaches the page through textContent / createElement / canvas fillText,
   never as HTML. Boxes are in original image pixels, as the API gives them; the canvas maps them with the view.
   Timing marks for benchmarks/bench_review_page.py: "aoi-queue-shown" (first queue drawn) and the measure
   "aoi-image" ("aoi-image-start" when an image is selected -> "aoi-image-drawn" once it is on screen with its
   boxes). */
(() => {
  "use strict";

  const PAGE_SIZE = 100;
  const MAX_SCALE = 32;
  const COLOURS = ["#ff453a", "#30d158", "#0a84ff", "#ff9f0a", "#bf5af2", "#64d2ff", "#ffd60a", "#ff375f",
                   "#a2845e", "#5e5ce6"];
  const DECISION_LABELS = {confirmed: "confirmed", false_call: "false call", corrected: "corrected",
                           skipped: "skipped"};
  const STATUS_LABELS = {model: "", confirmed: "✓ confirmed", false_call: "✗ false call",
                         relabelled: "relabelled", added: "+ added"};

  const byId = (id) => document.getElementById(id);
  const ui = {
    queue: byId("queue"), more: byId("more"), filters: byId("filters"), filterClass: byId("filter-class"),
    filterSummary: byId("filter-summary"), canvas: byId("canvas"), viewer: byId("viewer"),
    message: byId("viewer-message"), info: byId("info"), boxes: byId("boxes"), picker: byId("class-picker"),
    pickerTitle: byId("picker-title"), pickerButtons: byId("class-buttons"), status: byId("status"),
    counts: byId("counts"), pending: byId("pending"), help: byId("help"), who: byId("reviewer-name"),
    zoomLevel: byId("zoom-level"), drawButton: byId("act-draw"), falseButton: byId("act-false"),
  };

  const state = {
    classes: [],            // [{id, name}] of the served bundle
    items: [],              // queue items, newest first
    index: -1,              // the selected item
    nextBeforeSeq: null,
    totalUnreviewed: null,
    queueToken: 0,
    queueShown: false,
    image: null,            // the selected image, decoded (ImageBitmap)
    reduced: null,          // a smaller copy of a large image, drawn while zoomed out (cheaper to pan and zoom)
    imageToken: 0,
    imageFailed: false,
    markDrawn: null,        // key of an image whose first complete frame is still to be marked
    view: {scale: 1, tx: 0, ty: 0, fit: 1},
    edit: null,             // {boxes, stack}: the boxes as shown, with the reviewer's changes
    selected: -1,           // selected box
    mode: "pan",            // pan | draw | relabel | new-box
    busy: false,
    history: [],            // items whose decisions this page saved, newest last (undo)
    pointers: new Map(),
    gesture: null,          // pan | pinch | draw in progress
    paintQueued: false,
  };

  // ---------- small helpers ----------

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function colourIndex(classId) {
    const n = Number(classId);
    return Number.isFinite(n) && n >= 0 ? n % COLOURS.length : 0;
  }

  function keyOf(item) {
    return item.request_id + "/" + item.image_index;
  }

  function reviewUrl(item) {
    return "/v1/inspections/" + encodeURIComponent(item.request_id) + "/images/" + Number(item.image_index) +
      "/review";
  }

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  function formatTime(epochSeconds) {
    const d = new Date(Number(epochSeconds) * 1000);
    if (Number.isNaN(d.getTime())) return "";
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + pad(d.getHours()) + ":" +
      pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  function setStatus(text, isError) {
    ui.status.textContent = text;
    ui.status.classList.toggle("error", Boolean(isError));
  }

  function toLogin() {
    const next = window.location.pathname + window.location.search;
    window.location.assign("/review/login?next=" + encodeURIComponent(next));
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && typeof body.message === "string") return body.message;
    } catch (exc) { /* not JSON */ }
    return response.status + " " + response.statusText;
  }

  async function api(method, url, body) {
    const init = {method, credentials: "same-origin", headers: {"Accept": "application/json"}};
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    if (response.status === 401) {
      toLogin();
      throw new ApiError(401, "the session has ended: log in again");
    }
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    if (response.status === 204) return null;
    const text = await response.text();
    return text ? JSON.parse(text) : null;
  }

  // ---------- classes and filters ----------

  function parseClasses(data) {
    const list = Array.isArray(data) ? data : (data && (data.classes || data.items)) || [];
    return list.map((c, i) => (typeof c === "string" ? {id: i, name: c} : {
      id: Number(c.class_id ?? c.id ?? i),
      name: String(c.class_name ?? c.name ?? ""),
    }));
  }

  function className(classId) {
    const found = state.classes.find((c) => c.id === classId);
    return found ? found.name : "class " + classId;
  }

  async function loadClasses() {
    try {
      state.classes = parseClasses(await api("GET", "/v1/review/classes"));
    } catch (exc) {
      setStatus("Classes: " + exc.message, true);
      state.classes = [];
    }
    const known = new Set(Array.from(ui.filterClass.options, (o) => o.value));
    for (const c of state.classes) {
      if (known.has(c.name)) continue;
      const option = make("option", "", c.name);
      option.value = c.name;
      ui.filterClass.append(option);
    }
  }

  function localInputToIso(value) {
    if (!value) return "";
    const d = new Date(value);  // datetime-local: the browser's local time
    return Number.isNaN(d.getTime()) ? "" : d.toISOString();
  }

  function isoToLocalInput(value) {
    const d = new Date(value);
    if (!value || Number.isNaN(d.getTime())) return "";
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + "T" + pad(d.getHours()) + ":" +
      pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  function filtersFromForm() {
    const form = new FormData(ui.filters);
    const params = new URLSearchParams();
    for (const name of ["camera_id", "part_id", "class_name", "model_version"]) {
      const value = String(form.get(name) || "").trim();
      if (value) params.set(name, value);
    }
    for (const name of ["since", "until"]) {
      const iso = localInputToIso(String(form.get(name) || ""));
      if (iso) params.set(name, iso);
    }
    const verdict = String(form.get("verdict") || "NG");
    const status = String(form.get("status") || "unreviewed");
    if (verdict !== "NG") params.set("verdict", verdict);
    if (status !== "unreviewed") params.set("status", status);
    return params;
  }

  function filtersToForm(params) {
    for (const name of ["camera_id", "part_id", "model_version"]) {
      ui.filters.elements[name].value = params.get(name) || "";
    }
    for (const name of ["since", "until"]) ui.filters.elements[name].value = isoToLocalInput(params.get(name));
    const wanted = params.get("class_name") || "";
    if (wanted && !Array.from(ui.filterClass.options).some((o) => o.value === wanted)) {
      const option = make("option", "", wanted);  // before the class list has come
      option.value = wanted;
      ui.filterClass.append(option);
    }
    ui.filterClass.value = wanted;
    ui.filters.elements.verdict.value = params.get("verdict") || "NG";
    ui.filters.elements.status.value = params.get("status") || "unreviewed";
  }

  function describeFilters(params) {
    const parts = [];
    for (const [name, value] of params) parts.push(name + "=" + value);
    ui.filterSummary.textContent = parts.length ? "(" + parts.join(", ") + ")" : "(unreviewed NG)";
  }

  // ---------- the queue ----------

  function summary(detections) {
    const counts = new Map();
    for (const d of detections || []) counts.set(d.class_name, (counts.get(d.class_name) || 0) + 1);
    if (!counts.size) return "no detections";
    return Array.from(counts, ([name, n]) => (n > 1 ? name + " ×" + n : name)).join(", ");
  }

  function paintDecision(row, review) {
    const badge = row.querySelector(".item-decision");
    const decision = review && review.decision ? String(review.decision) : "";
    badge.textContent = DECISION_LABELS[decision] || decision;
    badge.className = "item-decision" + (DECISION_LABELS[decision] ? " " + decision : "");
    row.dataset.decision = decision;
  }

  function queueRow(item, index) {
    const row = make("li", "item");
    row.setAttribute("role", "option");
    row.setAttribute("aria-selected", "false");
    row.dataset.index = String(index);
    row.dataset.key = keyOf(item);
    const top = make("div", "item-top");
    const verdict = item.verdict === "OK" ? "OK" : "NG";
    top.append(make("span", "badge verdict-" + verdict.toLowerCase(), verdict),
               make("span", "item-camera", item.camera_id ?? "no camera"),
               make("span", "item-part", item.part_id ?? ""));
    const bottom = make("div", "item-bottom");
    bottom.append(make("time", "item-time", formatTime(item.received_at)), make("span", "item-decision"));
    row.append(top, make("div", "item-mid", summary(item.detections)), bottom);
    paintDecision(row, item.review);
    row.addEventListener("click", () => select(index));
    return row;
  }

  function rowOf(index) {
    return ui.queue.children[index] || null;
  }

  function updateCounts() {
    const left = state.totalUnreviewed === null ? "" : state.totalUnreviewed + " unreviewed · ";
    ui.counts.textContent = left + state.items.length + " loaded";
  }

  async function loadQueue(reset) {
    const params = filtersFromForm();
    params.set("limit", String(PAGE_SIZE));
    if (!reset && state.nextBeforeSeq !== null) params.set("before_seq", String(state.nextBeforeSeq));
    const token = ++state.queueToken;
    ui.more.disabled = true;
    let data;
    try {
      data = await api("GET", "/v1/review/queue?" + params.toString());
    } catch (exc) {
      setStatus("Queue: " + exc.message, true);
      ui.more.disabled = false;
      return 0;
    }
    if (token !== state.queueToken) return 0;
    if (reset) {
      state.items = [];
      state.index = -1;
      state.history = [];
      ui.queue.replaceChildren();
    }
    const rows = document.createDocumentFragment();
    for (const item of data.items || []) {
      state.items.push(item);
      rows.append(queueRow(item, state.items.length - 1));
    }
    ui.queue.append(rows);
    if (!state.items.length) ui.queue.append(make("li", "queue-empty", "Nothing to review with these filters."));
    state.nextBeforeSeq = data.next_before_seq ?? null;
    state.totalUnreviewed = data.total_unreviewed ?? null;
    ui.more.hidden = state.nextBeforeSeq === null;
    ui.more.disabled = false;
    ui.queue.dataset.count = String(state.items.length);
    updateCounts();
    if (!state.queueShown) {
      state.queueShown = true;
      performance.mark("aoi-queue-shown");
      document.body.dataset.queue = "shown";
    }
    if (reset) {
      if (state.items.length) select(0);
      else clearSelection();
    }
    return (data.items || []).length;
  }

  function applyFilters(event) {
    if (event) event.preventDefault();
    const params = filtersFromForm();
    describeFilters(params);
    const query = params.toString();
    window.history.replaceState(null, "", "/review" + (query ? "?" + query : ""));
    loadQueue(true);
  }

  // ---------- selection of an image ----------

  function current() {
    return state.index >= 0 ? state.items[state.index] : null;
  }

  function clearSelection() {
    state.index = -1;
    state.edit = null;
    state.image = null;
    ui.info.replaceChildren();
    ui.boxes.replaceChildren();
    ui.viewer.dataset.image = "";
    showMessage("No image selected.");
    paint();
  }

  function boxesOf(item) {
    const detections = item.detections || [];
    const model = detections.map((d, i) => ({
      ordinal: i, box: d.box_xyxy.map(Number), classId: d.class_id, className: d.class_name, score: d.score,
      modelClassId: d.class_id, modelClassName: d.class_name, status: "model",
    }));
    const review = item.review;
    if (!review || !Array.isArray(review.boxes) || review.decision === "skipped") return model;
    const shown = model.slice();
    const added = [];
    for (const b of review.boxes) {
      const ordinal = b.detection_ordinal;
      if (ordinal !== null && ordinal !== undefined && shown[ordinal]) {
        Object.assign(shown[ordinal], {classId: b.class_id, className: b.class_name, status: b.status});
      } else if (b.status === "added") {
        added.push({ordinal: null, box: b.box_xyxy.map(Number), classId: b.class_id, className: b.class_name,
                    score: null, modelClassId: null, modelClassName: null, status: "added"});
      }
    }
    return shown.concat(added);
  }

  function select(index) {
    if (index < 0 || index >= state.items.length) return;
    const before = rowOf(state.index);
    if (before) before.setAttribute("aria-selected", "false");
    state.index = index;
    const row = rowOf(index);
    row.setAttribute("aria-selected", "true");
    row.scrollIntoView({block: "nearest"});
    const item = state.items[index];
    state.edit = {boxes: boxesOf(item), stack: []};
    state.selected = -1;
    setMode("pan");
    renderInfo(item);
    renderBoxes();
    loadImage(item);
  }

  async function loadImage(item) {
    const token = ++state.imageToken;
    const key = keyOf(item);
    ui.viewer.dataset.image = key;
    ui.viewer.dataset.drawn = "0";
    state.imageFailed = false;
    state.markDrawn = null;
    if (state.image) state.image.close();
    if (state.reduced) state.reduced.close();
    state.image = null;
    state.reduced = null;
    performance.clearMarks("aoi-image-start");
    performance.mark("aoi-image-start");
    fit(item.width, item.height);
    if (item.image_kept === false) {
      state.imageFailed = true;
      showMessage("No image: it was not archived, or retention has deleted it. The boxes are shown alone.");
      return paint();
    }
    showMessage("Loading the image…");
    try {
      const response = await fetch(item.image_url, {credentials: "same-origin"});
      if (response.status === 401) return toLogin();
      if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
      const bitmap = await createImageBitmap(await response.blob());
      if (token !== state.imageToken) {
        bitmap.close();
        return undefined;
      }
      state.image = bitmap;
      fit(bitmap.width, bitmap.height);
      showMessage("");
      state.markDrawn = key;
      reduce(bitmap, token);
    } catch (exc) {
      if (token !== state.imageToken) return undefined;
      state.imageFailed = true;
      showMessage("No image: " + exc.message);
    }
    return paint();
  }

  async function reduce(bitmap, token) {
    // Over 4 MP, zoomed-out views draw a copy at twice the fitted size: a 20 MP frame redrawn on every pan step
    // costs tens of milliseconds without a GPU. Made after the first full-size frame, so it never delays it.
    const ratio = Math.min(1, state.view.fit * (window.devicePixelRatio || 1) * 2);
    if (bitmap.width * bitmap.height <= 4e6 || ratio > 0.7) return;
    try {
      const reduced = await createImageBitmap(bitmap, {resizeWidth: Math.round(bitmap.width * ratio),
                                                       resizeHeight: Math.round(bitmap.height * ratio),
                                                       resizeQuality: "medium"});
      if (token !== state.imageToken) reduced.close();
      else state.reduced = reduced;
    } catch (exc) { /* the full image serves */ }
  }

  function showMessage(text) {
    ui.message.textContent = text;
  }

  function renderInfo(item) {
    const rows = [
      ["Request", item.request_id], ["Image", item.image_index], ["Camera", item.camera_id ?? "—"],
      ["Part", item.part_id ?? "—"], ["Received", formatTime(item.received_at)],
      ["Model", (item.model_name || "") + " " + (item.model_version || "")], ["Verdict", item.verdict],
      ["Size", item.width + " × " + item.height + " px"],
    ];
    const review = item.review;
    if (review && review.decision) {
      const by = review.reviewer ? " by " + review.reviewer : "";
      rows.push(["Decision", (DECISION_LABELS[review.decision] || review.decision) + by + ", " +
                 formatTime(review.decided_at)]);
    } else {
      rows.push(["Decision", "not reviewed"]);
    }
    const nodes = [];
    for (const [label, value] of rows) nodes.push(make("dt", "", label), make("dd", "", value));
    ui.info.replaceChildren(...nodes);
  }

  // ---------- the boxes as shown, and the reviewer's changes ----------

  function labelOf(box) {
    const name = box.className ?? "pick a class";
    if (box.status === "relabelled") return box.modelClassName + " → " + name;
    if (box.status === "added") return "+ " + name;
    if (box.score === null || box.score === undefined) return name;
    return name + " " + Number(box.score).toFixed(2);
  }

  function renderBoxes() {
    const nodes = [];
    const boxes = state.edit ? state.edit.boxes : [];
    boxes.forEach((box, i) => {
      const row = make("li", "box");
      row.setAttribute("aria-selected", String(i === state.selected));
      row.dataset.status = box.status;
      const swatch = make("span", "swatch cls-" + colourIndex(box.classId));
      row.append(swatch, make("span", "box-name", (i + 1) + ". " + labelOf(box)),
                 make("span", "box-status " + box.status, STATUS_LABELS[box.status] ?? box.status));
      row.addEventListener("click", () => selectBox(i === state.selected ? -1 : i));
      nodes.push(row);
    });
    ui.boxes.replaceChildren(...nodes);
    ui.boxes.dataset.count = String(boxes.length);
    const changes = state.edit ? state.edit.stack.length : 0;
    ui.pending.textContent = changes ? changes + " change(s) not saved: C or Enter saves the image as shown" : "";
    ui.falseButton.lastChild.textContent = state.selected >= 0 ? " False box" : " False call";
    paint();
  }

  function selectBox(index) {
    if (!state.edit || state.mode === "new-box") return;  // the new box keeps the selection until it has a class
    state.selected = index >= 0 && index < state.edit.boxes.length ? index : -1;
    if (state.mode === "relabel" && state.selected < 0) setMode("pan");
    renderBoxes();
  }

  function change(mutate) {
    state.edit.stack.push(JSON.stringify({boxes: state.edit.boxes, selected: state.selected}));
    mutate();
    renderBoxes();
  }

  function relabel(box, classId) {
    box.classId = classId;
    box.className = className(classId);
    if (box.status === "added") return;
    box.status = classId === box.modelClassId ? "model" : "relabelled";
  }

  function toggleFalseCall(index) {
    const box = state.edit.boxes[index];
    change(() => {
      if (box.status === "added") {
        state.edit.boxes.splice(index, 1);
        state.selected = -1;
      } else if (box.status === "false_call") {
        box.status = "model";
      } else {
        box.status = "false_call";  // not a defect of any class: the model's class stays on record
        box.classId = box.modelClassId;
        box.className = box.modelClassName;
      }
    });
  }

  function pickClass(classId) {
    if (!state.edit || state.selected < 0 || !state.classes.some((c) => c.id === classId)) return;
    const box = state.edit.boxes[state.selected];
    if (state.mode === "new-box") {
      box.classId = classId;
      box.className = className(classId);
      renderBoxes();
    } else {
      change(() => relabel(box, classId));
    }
    setMode("pan");
  }

  function setMode(mode) {
    state.mode = mode;
    ui.viewer.dataset.mode = mode;
    ui.drawButton.setAttribute("aria-pressed", String(mode === "draw"));
    const picking = mode === "relabel" || mode === "new-box";
    ui.picker.hidden = !picking;
    if (picking) {
      ui.pickerTitle.textContent = mode === "new-box" ? "Class of the new box (1-9):" : "Relabel the box as (1-9):";
      const buttons = state.classes.map((c, i) => {
        const button = make("button", "", (i < 9 ? (i + 1) + "  " : "") + c.name);
        button.type = "button";
        button.addEventListener("click", () => pickClass(c.id));
        return button;
      });
      ui.pickerButtons.replaceChildren(...buttons);
    }
  }

  function cancel() {
    if (state.gesture && state.gesture.kind === "draw") state.gesture = null;
    if (state.mode === "new-box") {
      state.edit.stack.pop();
      state.edit.boxes.pop();
      state.selected = -1;
      setMode("pan");
      renderBoxes();
      return;
    }
    if (state.mode !== "pan") setMode("pan");
    else selectBox(-1);
    paint();
  }

  function startRelabel() {
    if (!state.edit || !state.edit.boxes.length) return setStatus("No box to relabel: D draws one", true);
    if (state.selected < 0) {
      if (state.edit.boxes.length !== 1) return setStatus("Select a box first: ] / [ or tap it", true);
      selectBox(0);
    }
    return setMode(state.mode === "relabel" ? "pan" : "relabel");
  }

  function toggleDraw() {
    if (!state.edit) return;
    setMode(state.mode === "draw" ? "pan" : "draw");
  }

  function addDrawnBox(box) {
    change(() => {
      state.edit.boxes.push({ordinal: null, box, classId: null, className: null, score: null, modelClassId: null,
                             modelClassName: null, status: "added"});
      state.selected = state.edit.boxes.length - 1;
    });
    if (state.classes.length === 1) {
      pickClass(state.classes[0].id);
      setMode("pan");
    } else {
      setMode("new-box");
    }
  }

  // ---------- decisions ----------

  function decisionAsShown() {
    const boxes = state.edit.boxes;
    if (boxes.some((b) => b.classId === null)) return null;
    if (boxes.every((b) => b.status === "model" || b.status === "confirmed")) return {decision: "confirmed"};
    if (boxes.length && boxes.every((b) => b.status === "false_call")) return {decision: "false_call"};
    return {
      decision: "corrected",  // the server fills the rest of each model box from the record
      boxes: boxes.map((b) => {
        if (b.status === "added") return {status: "added", box_xyxy: b.box, class_id: b.classId};
        const status = b.status === "model" ? "confirmed" : b.status;
        const out = {status, detection_ordinal: b.ordinal};
        if (status === "relabelled") out.class_id = b.classId;
        return out;
      }),
    };
  }

  function ready() {
    if (state.busy) return false;
    if (!current()) {
      setStatus("No image selected", true);
      return false;
    }
    return true;
  }

  async function decide(body) {
    if (!ready()) return;
    if (body === null) {
      setStatus("Pick a class for the new box first (1-9)", true);
      return;
    }
    const item = current();
    const index = state.index;
    const wasOpen = !item.review;
    state.busy = true;
    setStatus("Saving…");
    try {
      const saved = await api("POST", reviewUrl(item), body);
      item.review = saved;
      state.history.push(item);
      if (wasOpen && state.totalUnreviewed !== null) state.totalUnreviewed -= 1;
      paintDecision(rowOf(index), saved);
      updateCounts();
      setStatus("Saved " + (DECISION_LABELS[saved.decision] || saved.decision) + ": " + keyOf(item));
      await advance(index);
    } catch (exc) {
      setStatus("Not saved: " + exc.message, true);
    } finally {
      state.busy = false;
    }
  }

  async function advance(from) {
    if (from + 1 < state.items.length) return select(from + 1);
    if (state.nextBeforeSeq !== null && (await loadQueue(false)) > 0) return select(from + 1);
    renderInfo(state.items[from]);
    setStatus("End of the queue: every loaded image has been seen");
    return undefined;
  }

  function confirmAsShown() {
    if (!ready()) return;
    if (!state.image && !state.imageFailed) {
      setStatus("The image is still loading", true);
      return;
    }
    decide(decisionAsShown());
  }

  function falseCall() {
    if (!ready()) return;
    if (state.selected >= 0) toggleFalseCall(state.selected);
    else decide({decision: "false_call"});
  }

  async function undo() {
    if (state.busy) return;
    if (state.edit && state.edit.stack.length) {
      const previous = JSON.parse(state.edit.stack.pop());
      state.edit.boxes = previous.boxes;
      state.selected = previous.selected;
      setMode("pan");
      renderBoxes();
      setStatus("Undone: the last box change");
      return;
    }
    const item = state.history.pop();
    if (!item) {
      setStatus("Nothing to undo", true);
      return;
    }
    state.busy = true;
    try {
      const now = await api("DELETE", reviewUrl(item));
      const currentReview = now && Object.prototype.hasOwnProperty.call(now, "current") ? now.current : now;
      item.review = currentReview && currentReview.decision ? currentReview : null;
      const index = state.items.indexOf(item);
      if (!item.review && state.totalUnreviewed !== null) state.totalUnreviewed += 1;
      paintDecision(rowOf(index), item.review);
      updateCounts();
      select(index);
      setStatus("Undone: the decision on " + keyOf(item));
    } catch (exc) {
      setStatus("Undo failed: " + exc.message, true);
    } finally {
      state.busy = false;
    }
  }

  function step(delta) {
    if (!state.items.length) return;
    const target = state.index + delta;
    if (target >= 0 && target < state.items.length) select(target);
    else if (delta > 0) advance(state.index);
  }

  // ---------- the view: zoom, pan, painting ----------

  function viewerSize() {
    return {w: ui.viewer.clientWidth || 1, h: ui.viewer.clientHeight || 1};
  }

  function imageSize() {
    const item = current();
    if (state.image) return {w: state.image.width, h: state.image.height};
    return item ? {w: item.width || 1, h: item.height || 1} : {w: 1, h: 1};
  }

  function fit(width, height) {
    const {w, h} = viewerSize();
    const iw = width || imageSize().w;
    const ih = height || imageSize().h;
    const scale = Math.min(w / iw, h / ih) * 0.98;
    state.view = {scale, fit: scale, tx: (w - iw * scale) / 2, ty: (h - ih * scale) / 2};
    paint();
  }

  function zoomAt(factor, sx, sy) {
    const v = state.view;
    const scale = Math.min(MAX_SCALE, Math.max(v.fit * 0.5, v.scale * factor));
    v.tx = sx - (sx - v.tx) * (scale / v.scale);
    v.ty = sy - (sy - v.ty) * (scale / v.scale);
    v.scale = scale;
    paint();
  }

  function zoomCentre(factor) {
    const {w, h} = viewerSize();
    zoomAt(factor, w / 2, h / 2);
  }

  function actualPixels() {
    zoomCentre(1 / (state.view.scale * (window.devicePixelRatio || 1)));
  }

  function toImage(sx, sy) {
    const v = state.view;
    return {x: (sx - v.tx) / v.scale, y: (sy - v.ty) / v.scale};
  }

  function paint() {
    if (state.paintQueued) return;
    state.paintQueued = true;
    window.requestAnimationFrame(paintNow);
  }

  function paintNow() {
    state.paintQueued = false;
    const canvas = ui.canvas;
    const dpr = window.devicePixelRatio || 1;
    const {w, h} = viewerSize();
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const v = state.view;
    if (state.image) {
      const r = state.reduced;
      const useReduced = r && v.scale * dpr <= r.width / state.image.width;
      const k = useReduced ? state.image.width / r.width : 1;  // the copy's pixels are k of the image's
      ctx.setTransform(dpr * v.scale * k, 0, 0, dpr * v.scale * k, dpr * v.tx, dpr * v.ty);
      ctx.imageSmoothingEnabled = v.scale * dpr < 2;
      ctx.drawImage(useReduced ? r : state.image, 0, 0);
    }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    if (state.edit && (state.image || state.imageFailed)) {
      state.edit.boxes.forEach((box, i) => { if (i !== state.selected) drawBox(ctx, box, false); });
      if (state.selected >= 0 && state.edit.boxes[state.selected]) drawBox(ctx, state.edit.boxes[state.selected], true);
    }
    if (state.gesture && state.gesture.kind === "draw") drawRubberBand(ctx, state.gesture);
    ui.zoomLevel.textContent = Math.round(v.scale * dpr * 100) + " %";
    if (state.markDrawn && state.image && state.markDrawn === ui.viewer.dataset.image) {
      const key = state.markDrawn;
      state.markDrawn = null;
      // The frame just drawn is on screen once the next one starts.
      window.requestAnimationFrame(() => markDrawn(key));
    }
  }

  function markDrawn(key) {
    if (ui.viewer.dataset.image !== key) return;
    performance.clearMarks("aoi-image-drawn");
    performance.clearMeasures("aoi-image");
    performance.mark("aoi-image-drawn");
    performance.measure("aoi-image", "aoi-image-start", "aoi-image-drawn");
    ui.viewer.dataset.drawn = "1";
  }

  function screenRect(box) {
    const v = state.view;
    const [x1, y1, x2, y2] = box.box;
    return {x: x1 * v.scale + v.tx, y: y1 * v.scale + v.ty, w: (x2 - x1) * v.scale, h: (y2 - y1) * v.scale};
  }

  function drawBox(ctx, box, selected) {
    const r = screenRect(box);
    const falseCall = box.status === "false_call";
    const colour = falseCall ? "#9aa0a8" : (box.classId === null ? "#ffffff" : COLOURS[colourIndex(box.classId)]);
    ctx.lineWidth = selected ? 4 : 2;
    ctx.strokeStyle = colour;
    ctx.setLineDash(falseCall || box.status === "added" ? [6, 4] : []);
    ctx.strokeRect(r.x, r.y, r.w, r.h);
    ctx.setLineDash([]);
    if (selected) {
      ctx.lineWidth = 1;
      ctx.strokeStyle = "#ffffff";
      ctx.strokeRect(r.x - 4, r.y - 4, r.w + 8, r.h + 8);
    }
    const text = (falseCall ? "✗ " : "") + labelOf(box);
    ctx.font = (selected ? "bold " : "") + "13px system-ui, sans-serif";
    const width = ctx.measureText(text).width + 8;
    const ty = r.y >= 18 ? r.y - 18 : r.y + r.h;  // above the box, or under it at the top edge
    const lx = Math.max(0, Math.min(r.x - (selected ? 2 : 1), viewerSize().w - width));  // kept in view
    ctx.fillStyle = colour;
    ctx.fillRect(lx, ty, width, 18);
    ctx.fillStyle = "#000000";
    ctx.fillText(text, lx + 4, ty + 13);
  }

  function drawRubberBand(ctx, g) {
    const v = state.view;
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#ffffff";
    ctx.setLineDash([5, 3]);
    ctx.strokeRect(g.x0 * v.scale + v.tx, g.y0 * v.scale + v.ty, (g.x1 - g.x0) * v.scale, (g.y1 - g.y0) * v.scale);
    ctx.setLineDash([]);
  }

  function clampToImage(p) {
    const {w, h} = imageSize();
    return {x: Math.min(w, Math.max(0, p.x)), y: Math.min(h, Math.max(0, p.y))};
  }

  function boxAt(sx, sy) {
    if (!state.edit) return -1;
    let best = -1;
    let bestArea = Infinity;
    state.edit.boxes.forEach((box, i) => {
      const r = screenRect(box);
      const pad = 4;
      if (sx >= r.x - pad && sx <= r.x + r.w + pad && sy >= r.y - pad && sy <= r.y + r.h + pad && r.w * r.h < bestArea) {
        best = i;
        bestArea = r.w * r.h;
      }
    });
    return best;
  }

  // ---------- pointer: pan, pinch, draw, tap ----------

  function pointerPosition(event) {
    const rect = ui.canvas.getBoundingClientRect();
    return {x: event.clientX - rect.left, y: event.clientY - rect.top};
  }

  function startPinch() {
    const [a, b] = Array.from(state.pointers.values());
    state.gesture = {kind: "pinch", distance: Math.hypot(a.x - b.x, a.y - b.y) || 1,
                     mid: {x: (a.x + b.x) / 2, y: (a.y + b.y) / 2}, view: {...state.view}};
  }

  function onPointerDown(event) {
    if (event.button !== undefined && event.button > 0) return;
    ui.canvas.setPointerCapture(event.pointerId);
    const p = pointerPosition(event);
    state.pointers.set(event.pointerId, p);
    if (state.pointers.size === 2) return startPinch();
    if (state.pointers.size > 2) return undefined;
    if (state.mode === "draw" && state.edit) {
      const q = clampToImage(toImage(p.x, p.y));
      state.gesture = {kind: "draw", x0: q.x, y0: q.y, x1: q.x, y1: q.y};
    } else {
      state.gesture = {kind: "pan", start: p, view: {...state.view}, moved: false};
    }
    return undefined;
  }

  function onPointerMove(event) {
    if (!state.pointers.has(event.pointerId)) return;
    const p = pointerPosition(event);
    state.pointers.set(event.pointerId, p);
    const g = state.gesture;
    if (!g) return;
    if (g.kind === "pinch" && state.pointers.size >= 2) {
      const [a, b] = Array.from(state.pointers.values());
      const mid = {x: (a.x + b.x) / 2, y: (a.y + b.y) / 2};
      const ratio = (Math.hypot(a.x - b.x, a.y - b.y) || 1) / g.distance;
      const scale = Math.min(MAX_SCALE, Math.max(g.view.fit * 0.5, g.view.scale * ratio));
      const k = scale / g.view.scale;
      state.view = {...g.view, scale, tx: mid.x - (g.mid.x - g.view.tx) * k, ty: mid.y - (g.mid.y - g.view.ty) * k};
    } else if (g.kind === "draw") {
      const q = clampToImage(toImage(p.x, p.y));
      g.x1 = q.x;
      g.y1 = q.y;
    } else if (g.kind === "pan") {
      const dx = p.x - g.start.x;
      const dy = p.y - g.start.y;
      if (Math.abs(dx) + Math.abs(dy) > 4) g.moved = true;
      state.view = {...g.view, tx: g.view.tx + dx, ty: g.view.ty + dy};
    }
    paint();
  }

  function onPointerUp(event) {
    if (!state.pointers.delete(event.pointerId)) return;
    const g = state.gesture;
    if (!g) return;
    if (g.kind === "pinch") {
      state.gesture = null;  // the remaining finger does nothing until lifted
      return;
    }
    state.gesture = null;
    if (event.type === "pointercancel") return paint();
    if (g.kind === "draw") finishDrawing(g);
    else if (g.kind === "pan" && !g.moved) {
      const p = pointerPosition(event);
      selectBox(boxAt(p.x, p.y));
    }
    return paint();
  }

  function finishDrawing(g) {
    const box = [Math.min(g.x0, g.x1), Math.min(g.y0, g.y1), Math.max(g.x0, g.x1), Math.max(g.y0, g.y1)];
    const tooSmall = (box[2] - box[0]) * state.view.scale < 6 || (box[3] - box[1]) * state.view.scale < 6;
    if (tooSmall || box[2] - box[0] < 1 || box[3] - box[1] < 1) {
      setStatus("Box too small: drag a larger one", true);
      return;
    }
    addDrawnBox(box.map((x) => Math.round(x * 10) / 10));
  }

  function onWheel(event) {
    event.preventDefault();
    const p = pointerPosition(event);
    const delta = event.deltaMode === 1 ? event.deltaY * 16 : event.deltaY;
    zoomAt(Math.exp(-delta * 0.0015), p.x, p.y);
  }

  // ---------- keyboard ----------

  const KEYS = {
    c: confirmAsShown, enter: confirmAsShown, f: falseCall, r: startRelabel, d: toggleDraw,
    s: () => ready() && decide({decision: "skipped"}), u: undo, j: () => step(1), arrowright: () => step(1),
    k: () => step(-1), arrowleft: () => step(-1), "]": () => cycleBox(1), "[": () => cycleBox(-1), escape: cancel,
    "+": () => zoomCentre(1.25), "=": () => zoomCentre(1.25), "-": () => zoomCentre(0.8), "0": () => fit(),
    z: actualPixels, "?": toggleHelp,
  };

  function cycleBox(delta) {
    if (!state.edit || !state.edit.boxes.length) return;
    const n = state.edit.boxes.length;
    const from = state.selected < 0 ? (delta > 0 ? -1 : 0) : state.selected;
    selectBox((from + delta + n) % n);
  }

  function onKey(event) {
    const target = event.target;
    const typing = target && (target.tagName === "INPUT" || target.tagName === "SELECT" ||
                              target.tagName === "TEXTAREA");
    if (typing) {
      if (event.key === "Escape") target.blur();
      return;
    }
    if (ui.help.open || event.altKey || event.metaKey) return;
    const key = event.key.toLowerCase();
    if (event.ctrlKey) {
      if (key === "z") {
        event.preventDefault();
        undo();
      }
      return;
    }
    if ((key === "enter" || key === " ") && target && (target.tagName === "BUTTON" || target.tagName === "SUMMARY")) {
      return;  // the control's own
    }
    if (/^[1-9]$/.test(key)) {
      const chosen = state.classes[Number(key) - 1];
      if (chosen && state.selected >= 0) pickClass(chosen.id);
      event.preventDefault();
      return;
    }
    const action = KEYS[key];
    if (action) {
      event.preventDefault();
      action();
    }
  }

  function toggleHelp() {
    if (ui.help.open) ui.help.close();
    else ui.help.showModal();
  }

  // ---------- start ----------

  function wire() {
    ui.filters.addEventListener("submit", applyFilters);
    byId("reset-filters").addEventListener("click", () => {
      filtersToForm(new URLSearchParams());
      applyFilters();
    });
    ui.more.addEventListener("click", () => loadQueue(false));
    byId("prev").addEventListener("click", () => step(-1));
    byId("next").addEventListener("click", () => step(1));
    byId("zoom-in").addEventListener("click", () => zoomCentre(1.25));
    byId("zoom-out").addEventListener("click", () => zoomCentre(0.8));
    byId("zoom-fit").addEventListener("click", () => fit());
    byId("zoom-1").addEventListener("click", actualPixels);
    byId("act-confirm").addEventListener("click", confirmAsShown);
    ui.falseButton.addEventListener("click", falseCall);
    byId("act-relabel").addEventListener("click", startRelabel);
    ui.drawButton.addEventListener("click", toggleDraw);
    byId("act-skip").addEventListener("click", () => ready() && decide({decision: "skipped"}));
    byId("act-undo").addEventListener("click", undo);
    byId("picker-cancel").addEventListener("click", cancel);
    byId("help-button").addEventListener("click", toggleHelp);
    byId("help-close").addEventListener("click", () => ui.help.close());
    byId("logout").addEventListener("click", async () => {
      try {
        await fetch("/review/session", {method: "DELETE", credentials: "same-origin"});
      } finally {
        window.location.assign("/review/login");
      }
    });
    ui.canvas.addEventListener("pointerdown", onPointerDown);
    ui.canvas.addEventListener("pointermove", onPointerMove);
    ui.canvas.addEventListener("pointerup", onPointerUp);
    ui.canvas.addEventListener("pointercancel", onPointerUp);
    ui.canvas.addEventListener("wheel", onWheel, {passive: false});
    document.addEventListener("keydown", onKey);
    // A button clicked with the mouse or a finger lets go of the focus, so Enter then confirms (the shortcut) rather
    // than pressing that button again; a button reached with Tab keeps it (detail 0: a keyboard click).
    document.addEventListener("click", (event) => {
      const button = event.target instanceof Element ? event.target.closest("button") : null;
      if (button && event.detail > 0) button.blur();
    });
    new ResizeObserver(() => (state.image ? paint() : fit())).observe(ui.viewer);
  }

  async function start() {
    wire();
    const params = new URLSearchParams(window.location.search);
    // The filters fold away on short screens (1280x800: room for the queue), unless some are set.
    byId("filter-box").open = window.innerHeight > 900 || Array.from(params.keys()).length > 0;
    const name = window.localStorage.getItem("aoi-review-name");
    ui.who.textContent = name ? "Reviewer: " + name : "";
    filtersToForm(params);
    describeFilters(filtersFromForm());
    await Promise.all([loadClasses(), loadQueue(true)]);
    document.body.dataset.ready = "1";
  }

  start();
})();
