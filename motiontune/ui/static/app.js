// motiontune ui: plain JavaScript, no build step. The config form is generated from the JSON schema the
// server derives from the pydantic TrainConfig (/api/schema), and validated by the server (/api/validate).
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined) node.append(child);
  return node;
};

async function api(method, url, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const error = new Error((data && (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail))) || response.statusText);
    error.status = response.status;
    error.data = data;
    throw error;
  }
  return data;
}

// ------------------------------------------------------------------------------------------- state
const state = { schema: null, config: {}, errors: [], validateTimer: null, source: "" };

// ------------------------------------------------------------------------------------------- tabs
for (const tab of document.querySelectorAll("nav .tab")) {
  tab.addEventListener("click", () => showPage(tab.dataset.page));
}
function showPage(name) {
  for (const tab of document.querySelectorAll("nav .tab")) tab.classList.toggle("active", tab.dataset.page === name);
  for (const page of document.querySelectorAll(".page")) page.classList.toggle("active", page.id === `page-${name}`);
  if (name === "training") pollRun();
}

// ------------------------------------------------------------------------------------------- paths in the config
function getPath(object, path) {
  let node = object;
  for (const key of path) {
    if (node === null || node === undefined || typeof node !== "object") return undefined;
    node = node[key];
  }
  return node;
}
function setPath(object, path, value) {
  let node = object;
  path.forEach((key, index) => {
    if (index === path.length - 1) { node[key] = value; return; }
    if (node[key] === null || typeof node[key] !== "object") node[key] = typeof path[index + 1] === "number" ? [] : {};
    node = node[key];
  });
}
function deletePath(object, path) {
  const parent = getPath(object, path.slice(0, -1));
  if (parent && typeof parent === "object") delete parent[path[path.length - 1]];
}
const pathText = (path) => path.join(".");

// ------------------------------------------------------------------------------------------- schema helpers
function resolveRef(node) {
  if (node && node.$ref) return state.schema.$defs[node.$ref.split("/").pop()];
  return node;
}
function describe(prop) {
  // {kind, nullable, inner}: kind is object | array | enum | boolean | integer | number | string
  let nullable = false;
  let inner = prop;
  if (prop.anyOf) {
    const others = prop.anyOf.filter((branch) => branch.type !== "null");
    nullable = others.length < prop.anyOf.length;
    inner = others.length === 1 ? others[0] : others[0] || {};
  }
  inner = resolveRef(inner) || {};
  let kind = inner.type || "string";
  if (inner.enum) kind = "enum";
  else if (inner.properties) kind = "object";
  return { kind, nullable, inner };
}
function rangeText(inner) {
  const parts = [];
  if (inner.minimum !== undefined) parts.push(`≥ ${inner.minimum}`);
  if (inner.exclusiveMinimum !== undefined) parts.push(`> ${inner.exclusiveMinimum}`);
  if (inner.maximum !== undefined) parts.push(`≤ ${inner.maximum}`);
  if (inner.exclusiveMaximum !== undefined) parts.push(`< ${inner.exclusiveMaximum}`);
  if (inner.minLength !== undefined) parts.push(`at least ${inner.minLength} character(s)`);
  return parts.join(", ");
}
const shown = (value) => (value === undefined ? "(none)" : JSON.stringify(value));

// ------------------------------------------------------------------------------------------- the form
function renderForm() {
  const form = $("#config-form");
  form.replaceChildren();
  const root = state.schema;
  const general = el("details", { open: true, dataset: { section: "general" } }, el("summary", {}, "General"));
  form.append(general);
  for (const [key, prop] of Object.entries(root.properties)) {
    const info = describe(prop);
    const target = info.kind === "object" || info.kind === "array" ? form : general;
    target.append(renderField([key], prop, root, undefined));
  }
  showErrors();
}

function renderField(path, prop, parentSchema, parentDefault) {
  const key = path[path.length - 1];
  const info = describe(prop);
  let fallback = prop.default;
  if (parentDefault && typeof parentDefault === "object" && key in parentDefault) fallback = parentDefault[key];
  const value = getPath(state.config, path);
  const isSet = value !== undefined;
  const effective = isSet ? value : fallback;
  const required = (parentSchema.required || []).includes(key);

  if (info.kind === "object") {
    const box = el("details", { dataset: { path: pathText(path) }, class: "object" },
      el("summary", {}, `${key}`, prop.description ? el("span", { class: "hint" }, ` — ${prop.description}`) : null),
      el("div", { class: "error array-error", dataset: { errorFor: pathText(path) } }));
    if (info.inner.description && !prop.description) box.append(el("p", { class: "hint" }, info.inner.description));
    // a child's default: the section's default (transformer_2 defaults to train=false), else the child's own
    const defaults = fallback && typeof fallback === "object" ? fallback : {};
    for (const [childKey, childProp] of Object.entries(info.inner.properties)) {
      box.append(renderField([...path, childKey], childProp, info.inner, defaults));
    }
    return box;
  }
  if (info.kind === "array") return renderArray(path, prop, info, value, fallback);

  const wrapper = el("div", { class: `field ${isSet ? "set" : "default"}`, dataset: { path: pathText(path) } });
  const id = `field-${pathText(path).replace(/[^A-Za-z0-9_]/g, "-")}`;
  const control = makeControl(path, info, effective, id);
  const reset = el("button", { type: "button", class: "reset", title: "back to the default (remove the key)", onclick: () => {
    deletePath(state.config, path);
    renderForm();
    scheduleValidate();
  } }, "↺");
  const help = el("div", { class: "help" });
  if (prop.description) help.append(el("div", {}, prop.description));
  const facts = [];
  if (required) facts.push("required");
  else facts.push(`default ${shown(fallback)}`);
  const range = rangeText(info.inner);
  if (range) facts.push(range);
  if (info.kind === "enum") facts.push(`one of ${info.inner.enum.join(", ")}${info.nullable ? " or null" : ""}`);
  else if (info.nullable) facts.push("null allowed (empty)");
  help.append(el("div", {}, facts.join(" · ")));
  const notes = prop["x-not-supported"] || {};
  const note = notes[pathText(path.slice(0, -1).filter((p) => typeof p === "string"))];
  if (note) help.append(el("div", { class: "notsupported" }, note));
  wrapper.append(el("label", { for: id }, key), el("div", { class: "control" }, control, reset), help,
    el("div", { class: "error", dataset: { errorFor: pathText(path) } }));
  return wrapper;
}

function makeControl(path, info, effective, id) {
  const name = pathText(path);
  const commit = (value) => {
    setPath(state.config, path, value);
    const wrapper = $(`[data-path="${CSS.escape(name)}"]`);
    if (wrapper) { wrapper.classList.add("set"); wrapper.classList.remove("default"); }
    scheduleValidate();
  };
  if (info.kind === "boolean" && !info.nullable) {
    return el("input", { type: "checkbox", id, name, checked: effective === true, onchange: (e) => commit(e.target.checked) });
  }
  if (info.kind === "enum" || info.kind === "boolean") {
    const options = info.kind === "boolean" ? [true, false] : info.inner.enum;
    const select = el("select", { id, name, onchange: (e) => commit(JSON.parse(e.target.value)) });
    if (info.nullable) select.append(el("option", { value: "null" }, "null"));
    for (const option of options) select.append(el("option", { value: JSON.stringify(option) }, String(option)));
    select.value = JSON.stringify(effective === undefined ? null : effective);
    return select;
  }
  if (info.kind === "integer" || info.kind === "number") {
    const input = el("input", {
      type: "number", id, name, step: info.kind === "integer" ? "1" : "any",
      min: info.inner.minimum ?? info.inner.exclusiveMinimum, max: info.inner.maximum ?? info.inner.exclusiveMaximum,
      value: effective === null || effective === undefined ? "" : String(effective),
      placeholder: info.nullable ? "null" : "",
    });
    input.addEventListener("input", (e) => {
      const text = e.target.value.trim();
      if (text === "") commit(info.nullable ? null : "");
      else commit(Number(text));
    });
    return input;
  }
  const input = el("input", { type: "text", id, name, value: effective === null || effective === undefined ? "" : String(effective),
    placeholder: info.nullable ? "null" : "" });
  input.addEventListener("input", (e) => commit(e.target.value === "" && info.nullable ? null : e.target.value));
  return input;
}

function newItem(itemSchema) {
  const item = {};
  for (const key of itemSchema.required || []) {
    const info = describe(itemSchema.properties[key]);
    item[key] = info.kind === "integer" || info.kind === "number" ? 0 : info.kind === "boolean" ? false : "";
  }
  return item;
}

function renderArray(path, prop, info, value, fallback) {
  const items = Array.isArray(value) ? value : Array.isArray(fallback) ? fallback : null;
  const itemSchema = resolveRef(info.inner.items) || {};
  const box = el("details", { dataset: { path: pathText(path) }, class: "array", open: Array.isArray(items) && items.length > 0 },
    el("summary", {}, `${path[path.length - 1]} (${items ? items.length : "null"})`,
      prop.description ? el("span", { class: "hint" }, ` — ${prop.description}`) : null),
    el("div", { class: "error array-error", dataset: { errorFor: pathText(path) } }));
  if (itemSchema.description) box.append(el("p", { class: "hint" }, itemSchema.description));
  (items || []).forEach((_, index) => {
    const itemPath = [...path, index];
    const item = el("div", { class: "array-item", dataset: { path: pathText(itemPath) } },
      el("div", { class: "item-head" }, `${path[path.length - 1]}[${index}]`,
        el("button", { type: "button", onclick: () => {
          const list = getPath(state.config, path) || [...items];
          list.splice(index, 1);
          setPath(state.config, path, list);
          renderForm();
          scheduleValidate();
        } }, "remove")),
      el("div", { class: "error array-error", dataset: { errorFor: pathText(itemPath) } }));
    if (itemSchema.properties) {
      for (const [childKey, childProp] of Object.entries(itemSchema.properties)) {
        item.append(renderField([...itemPath, childKey], childProp, itemSchema, undefined));
      }
    }
    box.append(item);
  });
  const buttons = el("div", { class: "toolbar" },
    el("button", { type: "button", onclick: () => {
      const list = Array.isArray(getPath(state.config, path)) ? getPath(state.config, path) : [...(items || [])];
      list.push(newItem(itemSchema));
      setPath(state.config, path, list);
      renderForm();
      $(`[data-path="${CSS.escape(pathText(path))}"]`).open = true;
      scheduleValidate();
    } }, `add ${path[path.length - 1].replace(/s$/, "")}`));
  if (info.nullable && Array.isArray(value)) {
    buttons.append(el("button", { type: "button", onclick: () => { deletePath(state.config, path); renderForm(); scheduleValidate(); } },
      "unset (null)"));
  }
  box.append(buttons);
  return box;
}

// ------------------------------------------------------------------------------------------- validation
function scheduleValidate() {
  clearTimeout(state.validateTimer);
  state.validateTimer = setTimeout(validateNow, 250);
}
async function validateNow() {
  const result = await api("POST", "/api/validate", { config: state.config });
  state.errors = result.errors;
  showErrors();
  return result;
}
function showErrors() {
  for (const node of document.querySelectorAll("[data-error-for]")) node.textContent = "";
  for (const node of document.querySelectorAll(".field.invalid")) node.classList.remove("invalid");
  const general = $("#general-errors");
  general.replaceChildren();
  for (const error of state.errors) {
    let target = null;
    const parts = error.loc ? error.loc.split(".") : [];
    for (let n = parts.length; n > 0 && !target; n--) {
      target = document.querySelector(`[data-error-for="${CSS.escape(parts.slice(0, n).join("."))}"]`);
    }
    if (target) {
      target.textContent = target.textContent ? `${target.textContent}; ${error.msg}` : error.msg;
      const field = target.closest(".field");
      if (field) field.classList.add("invalid");
      for (let details = target.closest("details"); details; details = details.parentElement.closest("details")) details.open = true;
    } else {
      general.append(el("li", {}, error.loc ? `${error.loc}: ${error.msg}` : error.msg));
    }
  }
  const status = $("#config-status");
  status.textContent = state.errors.length ? `${state.errors.length} problem(s) in the config` : "config valid";
  status.className = `status ${state.errors.length ? "bad" : "ok"}`;
}

function setConfig(config, source) {
  state.config = config;
  state.source = source;
  $("#config-message").textContent = `loaded ${source}`;
  $("#config-message").className = "message";
  renderForm();
  validateNow();
}

// ------------------------------------------------------------------------------------------- load and save
$("#load-preset").addEventListener("click", async () => {
  const name = $("#preset-select").value;
  const data = await api("GET", `/api/presets/${encodeURIComponent(name)}`);
  setConfig(data.config, `preset ${name}`);
});
$("#load-file").addEventListener("click", async () => {
  try {
    const data = await api("POST", "/api/config/load", { path: $("#load-path").value });
    setConfig(data.config, data.path);
    $("#save-path").value = data.path;
  } catch (error) {
    $("#config-message").textContent = error.message;
    $("#config-message").className = "message bad";
  }
});
$("#save-file").addEventListener("click", async () => {
  try {
    const data = await api("POST", "/api/config/save", { path: $("#save-path").value, config: state.config });
    $("#config-message").textContent = `saved ${data.path}${data.ok ? "" : ` (with ${data.errors.length} problem(s))`}`;
    $("#config-message").className = "message";
  } catch (error) {
    $("#config-message").textContent = error.message;
    $("#config-message").className = "message bad";
  }
});
$("#download").addEventListener("click", () => {
  const blob = new Blob([JSON.stringify(state.config, null, 2) + "\n"], { type: "application/json" });
  const link = el("a", { href: URL.createObjectURL(blob), download: "motiontune-config.json" });
  document.body.append(link);
  link.click();
  link.remove();
});
$("#upload").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  try {
    const data = JSON.parse(await file.text());
    if (!data || typeof data !== "object" || Array.isArray(data)) throw new Error("the config must be a JSON object");
    setConfig(data, file.name);
  } catch (error) {
    $("#config-message").textContent = `${file.name}: ${error.message}`;
    $("#config-message").className = "message bad";
  }
  event.target.value = "";
});

// ------------------------------------------------------------------------------------------- dataset
$("#inspect").addEventListener("click", async () => {
  const status = $("#inspect-status");
  status.textContent = "inspecting…";
  status.className = "status";
  const folder = $("#dataset-folder").value.trim();
  try {
    const report = await api("POST", "/api/inspect", folder ? { folder, config: state.config } : { config: state.config });
    renderInspect(report);
    status.textContent = `${report.summary.usable_files} of ${report.summary.files} files usable`;
    status.className = "status ok";
  } catch (error) {
    const details = error.data && error.data.errors ? ": " + error.data.errors.map((e) => `${e.loc} ${e.msg}`).join("; ") : "";
    status.textContent = error.message + details;
    status.className = "status bad";
  }
});

function renderInspect(report) {
  const summary = report.summary;
  const lines = [`${summary.usable_files} of ${summary.files} files usable, ${summary.total_frames} frames in all`];
  for (const [bucket, count] of Object.entries(summary.clips_per_bucket)) {
    const [frames, width, height] = bucket.split("x");
    lines.push(`bucket ${width}x${height}, ${frames} frames: ${count} clip(s)`);
  }
  for (const [reason, count] of Object.entries(summary.skipped_by_reason)) lines.push(`skipped (${reason}): ${count}`);
  $("#inspect-summary").replaceChildren(el("ul", {}, lines.map((line) => el("li", {}, line))));
  const problems = $("#inspect-problems");
  problems.replaceChildren();
  const body = $("#inspect-table tbody");
  body.replaceChildren();
  for (const file of report.files) {
    for (const problem of file.problems) problems.append(el("li", {}, `${file.name}: ${problem}`));
    const meta = file.metadata || {};
    const thumbs = el("td", { class: "thumbnails" });
    file.thumbnails.forEach((frames, index) => {
      thumbs.append(el("div", { class: "thumbs", title: `clip ${index + 1}` },
        frames.map((src, n) => el("img", { src, alt: `${file.name} clip ${index + 1} ${["first", "middle", "last"][n]} frame` }))));
    });
    if (file.clips.length > file.thumbnails.length && file.thumbnails.length) {
      thumbs.append(el("div", { class: "hint" }, `+${file.clips.length - file.thumbnails.length} more clip(s)`));
    }
    body.append(el("tr", { class: file.usable ? "usable" : "skipped" },
      el("td", { title: file.path }, file.name),
      el("td", {}, meta.kind || "-"),
      el("td", {}, meta.kind === "video" ? `${meta.duration.toFixed(2)} s` : "-"),
      el("td", {}, meta.fps ? meta.fps.toFixed(2) : "-"),
      el("td", {}, meta.frames ? String(meta.frames) : "-"),
      el("td", {}, meta.width ? `${meta.width}x${meta.height}` : "-"),
      el("td", {}, file.bucket ? `${file.bucket.width}x${file.bucket.height}` : "-"),
      el("td", {}, file.clips.length ? `${file.clips.length} × ${file.clips[0].length} frames` : "-"),
      el("td", {}, file.caption ? file.caption : "no"),
      thumbs,
      el("td", { class: "problems" }, file.problems.join("; "))));
  }
  if (!problems.children.length) problems.append(el("li", { class: "none" }, "none"));
}

// ------------------------------------------------------------------------------------------- training
function trainMessage(text, bad = false, errors = []) {
  $("#train-message").textContent = text;
  $("#train-message").className = `message${bad ? " bad" : ""}`;
  $("#train-errors").replaceChildren(...errors.map((e) => el("li", {}, e.loc ? `${e.loc}: ${e.msg}` : e.msg)));
}
$("#start-training").addEventListener("click", async () => {
  try {
    const started = await api("POST", "/api/train/start", { config: state.config });
    trainMessage(`started (pid ${started.pid}); config saved as ${started.config}`);
    pollRun();
  } catch (error) {
    trainMessage(error.message, true, (error.data && error.data.errors) || []);
  }
});
$("#stop-training").addEventListener("click", async () => {
  try {
    const stopped = await api("POST", "/api/train/stop", {});
    trainMessage(`stop requested (SIGINT to pid ${stopped.signalled}): the step finishes, then a backup and the model are written`);
  } catch (error) {
    trainMessage(error.message, true);
  }
});
$("#watch").addEventListener("click", async () => {
  try {
    const watched = await api("POST", "/api/watch", { workspace: $("#watch-path").value });
    trainMessage(`watching ${watched.workspace}`);
    pollRun();
  } catch (error) {
    trainMessage(error.message, true);
  }
});

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  seconds = Math.round(seconds);
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  return h ? `${h}h ${m}m ${s}s` : m ? `${m}m ${s}s` : `${s}s`;
}

function drawChart(canvas, series, color, logScale = false) {
  // series: [[step, value], ...]; a line with min/max/last labels, drawn by hand (no chart library)
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  canvas.dataset.points = String(series.length);
  context.font = "11px sans-serif";
  context.fillStyle = "#667";
  if (!series.length) { context.fillText("no data yet", 10, 20); return; }
  const left = 56, right = 10, top = 10, bottom = 22;
  const steps = series.map((p) => p[0]);
  const values = series.map((p) => (logScale ? Math.log10(Math.max(p[1], 1e-30)) : p[1]));
  let [minX, maxX] = [Math.min(...steps), Math.max(...steps)];
  let [minY, maxY] = [Math.min(...values), Math.max(...values)];
  if (maxX === minX) maxX = minX + 1;
  if (maxY === minY) { const pad = Math.abs(maxY) * 0.1 || 0.5; maxY += pad; minY -= pad; }
  const x = (s) => left + ((s - minX) / (maxX - minX)) * (width - left - right);
  const y = (v) => top + (1 - (v - minY) / (maxY - minY)) * (height - top - bottom);
  context.strokeStyle = "#ccd";
  context.beginPath();
  context.moveTo(left, top); context.lineTo(left, height - bottom); context.lineTo(width - right, height - bottom);
  context.stroke();
  const label = (v) => (logScale ? Number(10 ** v).toExponential(1) : String(Number(v.toPrecision(3))));
  context.fillText(label(maxY), 2, top + 8);
  context.fillText(label(minY), 2, height - bottom);
  context.fillText(`step ${minX}`, left, height - 6);
  const endLabel = `step ${maxX}`;
  context.fillText(endLabel, width - right - context.measureText(endLabel).width, height - 6);
  context.strokeStyle = color;
  context.lineWidth = 1.5;
  context.beginPath();
  series.forEach((p, i) => (i ? context.lineTo(x(p[0]), y(values[i])) : context.moveTo(x(p[0]), y(values[i]))));
  context.stroke();
  if (series.length === 1) { context.fillStyle = color; context.fillRect(x(series[0][0]) - 2, y(values[0]) - 2, 4, 4); }
}

let pollTimer = null;
async function pollRun() {
  clearTimeout(pollTimer);
  try {
    renderRun(await api("GET", "/api/run"));
  } catch (error) {
    $("#run-state").textContent = `(${error.message})`;
  }
  if ($("#page-training").classList.contains("active")) pollTimer = setTimeout(pollRun, 1000);
}

function renderRun(run) {
  $("#run-workspace").textContent = run.workspace || "none (start a run, or watch a workspace)";
  if (!run.workspace) return;
  if (!$("#watch-path").value) $("#watch-path").value = run.workspace;
  const progress = run.progress || {};
  let stateText = run.running ? "training" : progress.state || (run.result ? "finished" : "not running");
  if (run.running && !run.progress) stateText = "starting (surveying data, encoding, loading the model)";
  if (!run.running && progress.state === "training") stateText = "ended without finishing (see the log)";
  if (run.owned && run.exit_code !== null && run.exit_code !== undefined) stateText += ` (exit code ${run.exit_code})`;
  $("#run-state").textContent = stateText;
  $("#run-state").dataset.state = run.running ? "running" : progress.state || "idle";
  $("#run-step").textContent = progress.total_steps ? `${progress.step} / ${progress.total_steps}` : "-";
  $("#run-progress").max = progress.total_steps || 1;
  $("#run-progress").value = progress.step || 0;
  $("#run-epoch").textContent = progress.epoch ?? "-";
  $("#run-elapsed").textContent = duration(progress.elapsed_seconds);
  $("#run-eta").textContent = run.running && progress.eta_seconds !== undefined
    ? (progress.eta_seconds === null ? "measuring…" : duration(progress.eta_seconds))
    : progress.state === "done" ? "done" : "-";
  const memory = progress.memory || {};
  const memoryParts = [];
  if (memory.rss_mb !== undefined) memoryParts.push(`RAM ${memory.rss_mb} MB (peak ${memory.peak_rss_mb} MB)`);
  if (memory.cuda_allocated_mb !== undefined) memoryParts.push(`GPU ${memory.cuda_allocated_mb} MB (peak ${memory.cuda_peak_mb} MB)`);
  $("#run-memory").textContent = memoryParts.join(", ") || "-";
  const scalars = run.scalars || {};
  const loss = scalars.loss || [];
  $("#run-loss").textContent = loss.length ? loss[loss.length - 1][1].toFixed(4) : "-";
  const lrTags = Object.keys(scalars).filter((tag) => tag === "lr" || tag.startsWith("lr/"));
  $("#run-lr").textContent = lrTags.map((tag) => {
    const series = scalars[tag];
    return series.length ? `${tag === "lr" ? "" : tag.slice(3) + " "}${series[series.length - 1][1].toExponential(2)}` : "";
  }).filter(Boolean).join(", ") || "-";
  drawChart($("#loss-chart"), loss, "#2b6cb0");
  drawChart($("#lr-chart"), lrTags.length ? scalars[lrTags[0]] : [], "#c05621");

  const samples = $("#samples");
  const present = new Set(run.samples.map((s) => s.name));
  for (const figure of [...samples.children]) if (!present.has(figure.dataset.name)) figure.remove();
  for (const sample of run.samples) {
    const url = `${sample.url}?v=${sample.modified}`;
    let figure = samples.querySelector(`figure[data-name="${CSS.escape(sample.name)}"]`);
    if (figure && figure.dataset.url !== url) { figure.remove(); figure = null; }
    if (!figure) {
      figure = el("figure", { dataset: { name: sample.name, url } },
        el("video", { src: url, controls: true, loop: true, muted: true, preload: "auto", playsinline: true }),
        el("figcaption", {}, sample.name));
      samples.prepend(figure);
    }
  }
  $("#backups").replaceChildren(...run.backups.map((backup) => el("li", { dataset: { name: backup.name } },
    `${backup.name}`, backup.info && backup.info.written ? ` — written ${backup.info.written}` : "")));
  if (!run.backups.length) $("#backups").append(el("li", { class: "none" }, "none yet"));
  const result = run.result;
  $("#run-result").replaceChildren(...(result && !run.running ? [el("p", {},
    `${result.interrupted ? "Stopped early (continue with --resume)" : "Finished"} after ${result.steps} steps; model: ${(result.loras || [result.lora]).join(", ")}`)] : []));
  const logBox = $("#run-log");
  const atBottom = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 5;
  logBox.textContent = run.log || "";
  if (atBottom) logBox.scrollTop = logBox.scrollHeight;
}

// ------------------------------------------------------------------------------------------- start
(async function start() {
  state.schema = await api("GET", "/api/schema");
  const { presets } = await api("GET", "/api/presets");
  $("#preset-select").replaceChildren(...presets.map((name) => el("option", { value: name }, name)));
  renderForm();
  validateNow();
  pollRun();
  document.body.dataset.ready = "1";
})();
