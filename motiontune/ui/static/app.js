// motiontune ui: plain JavaScript, no build step. The config form is generated from the JSON schema the
// server derives from the pydantic TrainConfig and docs/config.md (/api/schema), checked by the server
// (/api/validate) as it is edited, and kept by the server (/api/working) so a reload shows it again.
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
  for (const child of children.flat()) if (child !== null && child !== undefined && child !== false) node.append(child);
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
// config: the working config; touched: something was loaded or edited (before that, no problems are shown)
const state = { schema: null, config: {}, errors: [], warnings: [], touched: false, source: "", validateTimer: null,
                keepTimer: null, run: null, runs: [], valid: false, generation: 0, loading: Promise.resolve() };
// generation: bumped each time the config is replaced or edited. An answer the server computed for an older
// generation (an estimate, a validation) is out of date and never shown as current nor applied.
// loading: the config being replaced (a preset or file on its way); requests about the config wait for it.
const view = JSON.parse(localStorage.getItem("motiontune-view") || "{}"); // page, group, run, compare: this browser's
const remember = (changes) => { Object.assign(view, changes); localStorage.setItem("motiontune-view", JSON.stringify(view)); };

function message(selector, text, bad = false) {
  $(selector).textContent = text;
  $(selector).className = `message${bad ? " bad" : ""}`;
}

// ------------------------------------------------------------------------------------------- pages
for (const tab of document.querySelectorAll("header nav .tab")) tab.addEventListener("click", () => showPage(tab.dataset.page));
function showPage(name) {
  for (const tab of document.querySelectorAll("header nav .tab")) {
    tab.classList.toggle("active", tab.dataset.page === name);
    tab.setAttribute("aria-selected", String(tab.dataset.page === name));
  }
  for (const page of document.querySelectorAll(".page")) page.classList.toggle("active", page.id === `page-${name}`);
  remember({ page: name });
  if (name === "training") { refreshRuns(); pollRun(); }
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
  if (parent && typeof parent === "object" && !Array.isArray(parent)) delete parent[path[path.length - 1]];
}
const pathText = (path) => path.join(".");
const splitPath = (text) => text.split(".").map((p) => (/^\d+$/.test(p) ? Number(p) : p));

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
const shown = (value) => (value === undefined || value === null ? "not set" : JSON.stringify(value));

// ------------------------------------------------------------------------------------------- the form
const GROUP_TITLES = { general: "General", model: "Model", data: "Data", concepts: "Concepts", training: "Training",
                       sampling: "Sampling", backup: "Backup", tools: "Tools" };

function renderGroups() {
  const nav = $("#groups");
  nav.replaceChildren(...state.schema["x-groups"].map((group) => el("button", {
    type: "button", class: "group-tab", id: `group-${group}`, dataset: { group }, role: "tab", "aria-selected": "false",
    onclick: () => showGroup(group) }, GROUP_TITLES[group] || group)));
}
function showGroup(group) {
  remember({ group });
  for (const tab of document.querySelectorAll(".group-tab")) {
    tab.classList.toggle("active", tab.dataset.group === group);
    tab.setAttribute("aria-selected", String(tab.dataset.group === group));
  }
  for (const box of document.querySelectorAll("#config-form > .group")) box.hidden = box.dataset.group !== group;
  for (const panel of document.querySelectorAll("[data-group-panel]")) panel.hidden = !panel.dataset.groupPanel.split(" ").includes(group);
  if (group === "tools") $("#config-json").textContent = JSON.stringify(state.config, null, 2);
}

// Basic view: the few keys a first run needs, on one screen; Advanced: every key, by group. The config is the
// same in both (switching hides fields, it never drops a key).
const BASIC_KEYS = ["model_type", "training_method", "base_model_name", "resolution", "epochs", "learning_rate",
  "lora_rank", "workspace_dir", "output_model_destination", "concepts.*.path"];
const isBasic = (path) => BASIC_KEYS.some((key) => new RegExp(`^${key.replace(/\./g, "\\.").replace("*", "\\d+")}$`).test(path));
for (const radio of document.querySelectorAll('input[name="form-view"]')) {
  radio.addEventListener("change", () => { remember({ mode: radio.value }); applyView(); });
}
function applyView() {
  const basic = (view.mode || "advanced") === "basic";
  $(`#view-${basic ? "basic" : "advanced"}`).checked = true;
  const form = $("#config-form");
  form.classList.toggle("basic", basic);
  $("#groups").hidden = basic;
  if (!basic) { showGroup(view.group || "general"); return; }
  for (const box of form.querySelectorAll(".group")) box.hidden = false;
  for (const field of form.querySelectorAll(".field")) field.classList.toggle("basic-miss", !isBasic(field.dataset.path));
  for (const details of [...form.querySelectorAll("details")].reverse()) {
    // the concept list stays, with its add button, even while it is empty
    const hit = details.dataset.path === "concepts" || details.querySelector(".field:not(.basic-miss)") !== null;
    details.classList.toggle("basic-miss", !hit);
    if (hit) details.open = true;
  }
  for (const panel of document.querySelectorAll("[data-group-panel]")) panel.hidden = panel.id !== "estimate-panel";
}

// Keys the chosen model type and method never read (the server says which and why): hidden while they hold their
// default, so a beginner sees what matters; one set otherwise stays, and the check says what is wrong with it.
$("#show-inapplicable").addEventListener("change", (e) => {
  $("#config-form").classList.toggle("show-inapplicable", e.target.checked);
  if ($("#key-search").value.trim()) applySearch();
});
function applyApplicability() {
  const form = $("#config-form");
  const rules = Object.entries(state.notApplicable || {}).map(([key, why]) =>
    [new RegExp(`^${key.replace(/\./g, "\\.").replace(/\*/g, "\\d+")}(\\.|$)`), why]);
  let hidden = 0;
  for (const field of form.querySelectorAll(".field[data-path]")) {
    const rule = rules.find(([pattern]) => pattern.test(field.dataset.path));
    const value = getPath(state.config, field.dataset.path.split("."));
    const unused = Boolean(rule) && (value === undefined || JSON.stringify(value) === field.dataset.fallback);
    field.classList.toggle("inapplicable", unused);
    if (unused) field.title = `does not apply: ${rule[1]}`; else field.removeAttribute("title");
    hidden += unused;
  }
  // a section goes with its keys: hidden when every key in it is
  for (const details of [...form.querySelectorAll("details[data-path]")].reverse()) {
    const ruled = rules.some(([pattern]) => pattern.test(details.dataset.path));
    const shown = details.querySelector(".field:not(.inapplicable)") !== null;
    details.classList.toggle("inapplicable", ruled && !shown);
  }
  const note = $("#inapplicable-note");
  note.hidden = !hidden;
  if ($("#key-search").value.trim()) applySearch(); // a search counts what is hidden apart
  note.querySelector("span").textContent = `${hidden} key(s) hidden: they do not apply to ${state.config.model_type || "this model"} ` +
    `with ${state.config.training_method || "LORA"} (show them to read why, on each).`;
}

// Find a key: every group at once, only the fields whose key or help holds the words typed
$("#key-search").addEventListener("input", applySearch);
function applySearch() {
  const words = $("#key-search").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  const form = $("#config-form");
  form.classList.toggle("searching", words.length > 0);
  if (!words.length) {
    for (const node of form.querySelectorAll(".field, details")) node.classList.remove("search-miss");
    $("#key-search-count").textContent = "";
    applyView();
    return;
  }
  for (const box of form.querySelectorAll(".group")) box.hidden = false;
  let found = 0, unused = 0;
  const showingUnused = form.classList.contains("show-inapplicable");
  for (const field of form.querySelectorAll(".field")) {
    const text = `${field.dataset.path} ${field.querySelector(".help") ? field.querySelector(".help").textContent : ""}`.toLowerCase();
    const hit = words.every((word) => text.includes(word));
    field.classList.toggle("search-miss", !hit);
    const hidden = field.classList.contains("inapplicable") && !showingUnused;
    found += hit && !hidden;
    unused += hit && hidden;
  }
  // a section shows while something inside it matches, opened so the match is seen
  for (const details of [...form.querySelectorAll("details")].reverse()) {
    const hit = [...details.querySelectorAll(".field:not(.search-miss)")].some((f) => showingUnused || !f.classList.contains("inapplicable"));
    details.classList.toggle("search-miss", !hit);
    if (hit) details.open = true;
  }
  $("#key-search-count").textContent = `${found} key(s) found` + (unused ? `, and ${unused} that do not apply to this model and method ("show them" below)` : "");
}

function renderForm() {
  const form = $("#config-form");
  const open = new Set([...form.querySelectorAll("details[open]")].map((d) => d.dataset.path));
  form.replaceChildren();
  const root = state.schema;
  const boxes = {};
  for (const group of root["x-groups"]) {
    boxes[group] = el("div", { class: "group", dataset: { group } });
    form.append(boxes[group]);
  }
  boxes.tools.append(el("p", { class: "hint" }, "The memory estimate for this config, and the config as JSON."));
  for (const [key, prop] of Object.entries(root.properties)) {
    if (key === "__version") continue; // OneTrainer's format version: kept as loaded, not a setting
    const field = key === "concepts" ? renderConcepts(prop) : renderField([key], prop, root, undefined);
    boxes[prop["x-group"] || "general"].append(field);
  }
  for (const details of form.querySelectorAll("details")) if (open.has(details.dataset.path)) details.open = true;
  showGroup(view.group && boxes[view.group] ? view.group : "general");
  showErrors();
  applyApplicability();
  applyView();
  if ($("#key-search").value.trim()) applySearch(); // a search stays applied while the form is redrawn
}

function helpBox(prop, info, path, fallback, required) {
  const help = el("div", { class: "help" });
  // docs/config.md's row for the key (units, ranges, rounding); the schema's own words where the docs have none
  const text = prop["x-help"] || prop.description || info.inner.description;
  if (text) help.append(el("div", { class: "doc" }, text));
  const facts = [];
  if (required) facts.push("required");
  else if (!(prop["x-help"] || "").startsWith("default") || fallback !== prop.default) facts.push(`default ${shown(fallback)}`);
  const range = rangeText(info.inner);
  if (range && !prop["x-help"]) facts.push(range); // the docs' row says the range in words
  if (facts.length) help.append(el("div", { class: "facts" }, facts.join(" · ")));
  const notes = prop["x-not-supported"] || {};
  const note = notes[pathText(path.slice(0, -1).filter((p) => typeof p === "string"))];
  if (note) help.append(el("div", { class: "notsupported" }, note));
  return help;
}

function changed() {
  state.touched = true;
  configReplaced();
  scheduleValidate();
  keepWorking();
  if (!$("#config-json").closest("[hidden]")) $("#config-json").textContent = JSON.stringify(state.config, null, 2);
}

function renderField(path, prop, parentSchema, parentDefault) {
  const key = path[path.length - 1];
  const info = describe(prop);
  let fallback = prop.default;
  if (parentDefault && typeof parentDefault === "object" && key in parentDefault) fallback = parentDefault[key];
  const value = getPath(state.config, path);
  const isSet = value !== undefined;
  const required = (parentSchema.required || []).includes(key);

  if (info.kind === "object") {
    const box = el("details", { dataset: { path: pathText(path) }, class: "object" },
      el("summary", {}, String(key)),
      el("div", { class: "help" }, prop["x-help"] || prop.description || info.inner.description || ""),
      el("div", { class: "error array-error", dataset: { errorFor: pathText(path) } }),
      el("div", { class: "warning", dataset: { warningFor: pathText(path) } }));
    const defaults = fallback && typeof fallback === "object" ? fallback : {};
    for (const [childKey, childProp] of Object.entries(info.inner.properties)) {
      if (childKey === "__version") continue;
      box.append(renderField([...path, childKey], childProp, info.inner, defaults));
    }
    return box;
  }
  if (info.kind === "array") return renderArray(path, prop, info, value, fallback);

  const wrapper = el("div", { class: `field ${isSet ? "set" : "default"}`, dataset: { path: pathText(path), fallback: JSON.stringify(fallback ?? null) } });
  const id = `field-${pathText(path).replace(/[^A-Za-z0-9_]/g, "-")}`;
  const control = makeControl(path, prop, info, isSet ? value : fallback, fallback, id);
  const reset = el("button", { type: "button", class: "reset", title: "back to the default (remove the key)", "aria-label": `${key}: back to the default`, onclick: () => {
    deletePath(state.config, path);
    renderForm();
    changed();
  } }, "↺");
  // a screen reader reads the field's help, error and warning with it
  control.setAttribute("aria-describedby", `${id}-help ${id}-error ${id}-warning`);
  const help = helpBox(prop, info, path, fallback, required);
  help.id = `${id}-help`;
  const picker = JSON.stringify(prop).includes('"x-path":true') ? pickButton(control, pathText(path)) : null;
  wrapper.append(el("label", { for: id }, String(key)), el("div", { class: "control" }, control, picker, reset), help,
    el("div", { class: "error", id: `${id}-error`, dataset: { errorFor: pathText(path) } }),
    el("div", { class: "warning", id: `${id}-warning`, dataset: { warningFor: pathText(path) } }));
  return wrapper;
}

function makeControl(path, prop, info, effective, fallback, id) {
  const name = pathText(path);
  const commit = (value) => {
    if (value === undefined) deletePath(state.config, path);
    else setPath(state.config, path, value);
    const wrapper = $(`.field[data-path="${CSS.escape(name)}"]`);
    if (wrapper) { wrapper.classList.toggle("set", value !== undefined); wrapper.classList.toggle("default", value === undefined); }
    changed();
  };
  if (info.kind === "boolean" && !info.nullable) {
    return el("input", { type: "checkbox", id, name, checked: effective === true, onchange: (e) => commit(e.target.checked) });
  }
  if (info.kind === "enum" || info.kind === "boolean") {
    // only the values training accepts today; a value typed in a file that is not one stays visible, marked
    const options = info.kind === "boolean" ? [true, false] : prop["x-accepted"] || info.inner.enum;
    const select = el("select", { id, name, onchange: (e) => commit(JSON.parse(e.target.value)) });
    if (info.nullable) select.append(el("option", { value: "null" }, fallback === null || fallback === undefined ? "(not set)" : `(not set: ${fallback})`));
    for (const option of options) select.append(el("option", { value: JSON.stringify(option) }, String(option)));
    const current = JSON.stringify(effective === undefined ? null : effective);
    if (![...select.options].some((o) => o.value === current)) {
      select.append(el("option", { value: current, class: "invalid-choice" }, `${effective} (not valid)`));
    }
    select.value = current;
    return select;
  }
  const numeric = info.kind === "integer" || info.kind === "number";
  const placeholder = fallback === null || fallback === undefined ? "not set" : fallback === "" ? "(empty)" : `default ${fallback}`;
  const input = el("input", {
    type: "text", id, name, inputmode: numeric ? "decimal" : undefined, spellcheck: "false",
    value: effective === null || effective === undefined ? "" : String(effective), placeholder,
  });
  input.addEventListener("input", (e) => {
    const text = e.target.value.trim();
    if (text === "") commit(info.nullable ? null : undefined); // empty: not set (null), or back to the default
    else if (numeric && text !== "" && !Number.isNaN(Number(text))) commit(Number(text));
    else commit(e.target.value); // the server says what is wrong with it ("enter a whole number")
  });
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

function renderArray(path, prop, info, value, fallback, title = null) {
  const items = Array.isArray(value) ? value : Array.isArray(fallback) ? fallback : null;
  const itemSchema = resolveRef(info.inner.items) || {};
  const key = path[path.length - 1];
  const box = el("details", { dataset: { path: pathText(path) }, class: "array", open: Array.isArray(items) && items.length > 0 },
    el("summary", {}, `${key} (${items ? items.length : "none"})`),
    el("div", { class: "help" }, prop["x-help"] || prop.description || ""),
    el("div", { class: "error array-error", dataset: { errorFor: pathText(path) } }));
  (items || []).forEach((item, index) => {
    const itemPath = [...path, index];
    const head = title ? title(item, index) : `${key}[${index}]`;
    const card = el("div", { class: "array-item", dataset: { path: pathText(itemPath) } },
      el("div", { class: "item-head" }, el("span", {}, head),
        el("button", { type: "button", class: "remove", onclick: () => {
          const list = getPath(state.config, path) || [...items];
          list.splice(index, 1);
          setPath(state.config, path, list);
          renderForm();
          changed();
        } }, "remove")),
      el("div", { class: "error array-error", dataset: { errorFor: pathText(itemPath) } }));
    for (const [childKey, childProp] of Object.entries(itemSchema.properties || {})) {
      if (childKey === "__version" || childKey === "concept_stats") continue;
      card.append(renderField([...itemPath, childKey], childProp, itemSchema, undefined));
    }
    box.append(card);
  });
  const buttons = el("div", { class: "toolbar" },
    el("button", { type: "button", class: "add", onclick: () => {
      const list = Array.isArray(getPath(state.config, path)) ? getPath(state.config, path) : [...(items || [])];
      list.push(newItem(itemSchema));
      setPath(state.config, path, list);
      if (path[0] === "concepts" && state.config.concept_file_name) {
        // the two ways of naming the data exclude each other: say which one now stands
        message("#config-message", `the concepts are listed in this config now, instead of in ${state.config.concept_file_name} (concept_file_name)`);
        delete state.config.concept_file_name;
      }
      renderForm();
      $(`details[data-path="${CSS.escape(pathText(path))}"]`).open = true;
      changed();
    } }, `add ${String(key).replace(/s$/, "")}`));
  box.append(buttons);
  return box;
}

function renderConcepts(prop) {
  // the concept editor: a card per concept, titled by its name or folder, with Inspect for its folder
  const info = describe(prop);
  const box = renderArray(["concepts"], prop, info, getPath(state.config, ["concepts"]), undefined, (concept, index) => {
    const label = `${index + 1}. ${concept.name || concept.path || "(no folder yet)"}${concept.enabled === false ? " (disabled)" : ""}`;
    return el("span", {}, label, " ", el("button", { type: "button", class: "inspect-concept", onclick: (e) => {
      e.preventDefault();
      $("#dataset-folder").value = concept.path || "";
      showPage("dataset");
      $("#inspect").click();
    } }, "inspect"));
  });
  box.open = true;
  const file = state.config.concept_file_name;
  if (file && !Array.isArray(state.config.concepts)) {
    // OneTrainer's way: the concepts live in their own file, which this page does not edit
    box.insertBefore(el("p", { class: "note", id: "concepts-from-file" },
      `This config reads its concepts from ${file} (concept_file_name). Create that file, or add a concept below `
      + "to list your folders in the config itself (that replaces concept_file_name)."), box.children[2]);
  }
  return box;
}

// ------------------------------------------------------------------------------------------- validation
function scheduleValidate() {
  clearTimeout(state.validateTimer);
  state.validateTimer = setTimeout(validateNow, 250);
}
async function validateNow() {
  const generation = state.generation;
  const result = await api("POST", "/api/validate", { config: state.config });
  if (generation !== state.generation) return result; // the config changed meanwhile: its own validation follows
  state.errors = result.errors;
  state.warnings = result.warnings;
  state.valid = result.ok;
  state.notApplicable = result.not_applicable || {};
  showErrors();
  applyApplicability();
  updateButtons();
  return result;
}
function targetFor(loc, attribute) {
  const parts = loc ? loc.split(".") : [];
  for (let n = parts.length; n > 0; n--) {
    const target = document.querySelector(`[${attribute}="${CSS.escape(parts.slice(0, n).join("."))}"]`);
    if (target) return target;
  }
  return null;
}
function openTo(node) {
  for (let details = node.closest("details"); details; details = details.parentElement.closest("details")) details.open = true;
}
function showErrors() {
  for (const node of document.querySelectorAll("[data-error-for], [data-warning-for]")) node.replaceChildren();
  for (const node of document.querySelectorAll(".field.invalid, .field.warned")) node.classList.remove("invalid", "warned");
  for (const tab of document.querySelectorAll(".group-tab")) tab.classList.remove("has-errors");
  const general = $("#general-errors");
  general.replaceChildren();
  const unknown = $("#unknown-keys ul");
  unknown.replaceChildren();
  const active = state.touched;
  $("#empty-state").hidden = active;
  for (const error of active ? state.errors : []) {
    if (error.unknown) { unknown.append(unknownKeyItem(error)); continue; }
    const target = targetFor(error.loc, "data-error-for");
    if (target) {
      target.append(el("div", {}, error.msg, fixButton(error)));
      const field = target.closest(".field");
      if (field) field.classList.add("invalid");
      openTo(target);
      const group = target.closest(".group");
      if (group) $(`#group-${group.dataset.group}`).classList.add("has-errors");
    } else {
      general.append(el("li", {}, error.loc ? `${error.loc}: ${error.msg}` : error.msg));
    }
  }
  $("#unknown-keys").hidden = !unknown.children.length;
  for (const warning of active ? state.warnings : []) {
    const target = targetFor(warning.loc, "data-warning-for");
    if (target) {
      target.append(el("div", {}, warning.msg));
      const field = target.closest(".field");
      if (field) field.classList.add("warned");
      openTo(target);
    } else general.append(el("li", { class: "warning" }, warning.msg));
  }
  const status = $("#config-status");
  if (!active) {
    status.textContent = "no config loaded";
    status.className = "status";
  } else {
    const count = state.errors.length;
    status.textContent = count ? `${count} problem(s) in the config` : "config valid";
    status.className = `status ${count ? "bad" : "ok"}`;
    status.title = count ? "show the first problem" : "";
  }
}
function fixButton(error) {
  // a choice typed wrong in a file: one click puts the close one in
  if (error.suggest === undefined || error.unknown) return null;
  return el("button", { type: "button", class: "fix", onclick: () => {
    setPath(state.config, splitPath(error.loc), error.suggest);
    renderForm();
    changed();
  } }, `use ${JSON.stringify(error.suggest)}`);
}
function unknownKeyItem(error) {
  const path = splitPath(error.loc);
  const value = getPath(state.config, path);
  const remove = el("button", { type: "button", class: "remove-key", onclick: () => {
    deletePath(state.config, path);
    renderForm();
    changed();
  } }, "remove");
  const rename = error.suggest ? el("button", { type: "button", class: "rename-key", onclick: () => {
    deletePath(state.config, path);
    setPath(state.config, [...path.slice(0, -1), error.suggest], value);
    renderForm();
    changed();
  } }, `rename to ${error.suggest}`) : null;
  return el("li", { dataset: { key: error.loc } }, el("code", {}, error.loc), ` = ${JSON.stringify(value)}: ${error.msg} `, rename, remove);
}

// the problem count in the header takes you to the first problem
$("#config-status").addEventListener("click", showFirstProblem);
$("#config-status").addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") showFirstProblem(); });
function showFirstProblem() {
  const first = state.touched && state.errors[0];
  if (!first) return;
  showPage("config");
  const target = (first.unknown && $("#unknown-keys")) || targetFor(first.loc, "data-error-for") || $("#general-errors");
  const group = target.closest(".group");
  if (group) showGroup(group.dataset.group);
  openTo(target);
  target.scrollIntoView({ block: "center" });
  const field = target.closest(".field");
  const input = field && field.querySelector("input, select, textarea");
  if (input) input.focus();
}

// ------------------------------------------------------------------------------------------- working config
function keepWorking() {
  clearTimeout(state.keepTimer);
  state.keepTimer = setTimeout(() => api("PUT", "/api/working", { config: state.config, source: state.source, save_path: $("#save-path").value })
    .catch((error) => message("#config-message", `could not keep the form: ${error.message}`, true)), 300);
}
function setConfig(config, source) {
  state.config = config;
  state.source = source;
  configReplaced();
  state.touched = true;
  message("#config-message", `loaded ${source}`);
  renderForm();
  validateNow();
  keepWorking();
}

// Replacing the config takes a round trip: until it is done, nothing may act on the form being replaced.
function replaceConfig(work) {
  const done = state.loading.then(work).catch((error) => message("#config-message", error.message, true));
  state.loading = done;
  document.body.dataset.loading = "1";
  done.then(() => { if (state.loading === done) delete document.body.dataset.loading; });
}
$("#load-preset").addEventListener("click", () => {
  const name = $("#preset-select").value;
  replaceConfig(async () => {
    const data = await api("GET", `/api/presets/${encodeURIComponent(name)}`);
    $("#save-path").value = ""; // Save must not overwrite the file loaded before the preset
    setConfig(data.config, `preset ${name}`);
  });
});
$("#load-file").addEventListener("click", () => {
  const path = $("#load-path").value;
  replaceConfig(async () => {
    const data = await api("POST", "/api/config/load", { path });
    $("#save-path").value = data.path;
    setConfig(data.config, data.path);
  });
});
$("#save-file").addEventListener("click", async () => {
  if (!$("#save-path").value.trim()) {
    message("#config-message", "name the file to save as first (Save as)", true);
    $("#save-path").focus();
    return;
  }
  try {
    const data = await api("POST", "/api/config/save", { path: $("#save-path").value, config: state.config });
    message("#config-message", `saved ${data.path}${data.ok ? "" : ` (with ${data.errors.length} problem(s))`}`);
    keepWorking();
  } catch (error) {
    message("#config-message", error.message, true);
  }
});
$("#download").addEventListener("click", () => {
  const blob = new Blob([JSON.stringify(state.config, null, 2) + "\n"], { type: "application/json" });
  const link = el("a", { href: URL.createObjectURL(blob), download: "motiontune-config.json" });
  document.body.append(link);
  link.click();
  link.remove();
});
$("#upload").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  replaceConfig(async () => {
    let data;
    try { data = JSON.parse(await file.text()); } catch (error) { throw new Error(`${file.name}: ${error.message}`); }
    if (!data || typeof data !== "object" || Array.isArray(data)) throw new Error(`${file.name}: the config must be a JSON object`);
    $("#save-path").value = ""; // an upload has no path on this machine: Save asks for one
    setConfig(data, file.name);
  });
  event.target.value = "";
});

// ------------------------------------------------------------------------------------------- memory estimate
const gb = (value) => (value >= 10 ? value.toFixed(1) : value >= 0.1 ? value.toFixed(2) : value.toPrecision(2));
function configReplaced() {
  // whatever the estimate panel shows was computed for the config before this one
  state.generation += 1;
  const panel = $("#estimate-panel");
  if (panel.dataset.state === "done" || panel.dataset.state === "running") {
    message("#estimate-result", "The config changed since this estimate: estimate again.");
    panel.dataset.state = "stale";
  }
  delete panel.dataset.fits;
  $("#estimate-changes").replaceChildren();
}
async function runEstimate() {
  await state.loading; // a preset or file still on its way is the config to estimate
  const gpu = Number($("#estimate-gpu").value);
  const panel = $("#estimate-panel");
  const generation = state.generation;
  panel.dataset.state = "running";
  delete panel.dataset.fits;
  message("#estimate-result", "estimating…");
  $("#estimate-changes").replaceChildren();
  try {
    const result = await api("POST", "/api/estimate", { config: state.config, gpu_gb: gpu });
    if (generation !== state.generation) { // configReplaced() has marked the panel out of date
      panel.dataset.dropped = String(Number(panel.dataset.dropped || 0) + 1);
      return;
    }
    panel.dataset.state = "done";
    panel.dataset.fits = result.fits ? "yes" : "no";
    message("#estimate-result", `The training step needs ${gb(result.device_gb)} GB on the GPU (${result.shape}): ` +
      (result.fits ? `fits ${gpu} GB (${gb(result.usable_gb - result.device_gb)} GB to spare).`
                   : `does not fit ${gpu} GB (${gb(result.usable_gb)} GB usable).`), !result.fits);
    if (!result.fits && !result.changes.length) $("#estimate-changes").append(el("li", {}, "nothing fits at this size: lower resolution, frames or batch_size"));
    for (const change of result.changes) {
      $("#estimate-changes").append(el("li", {}, `${change.change}: ${gb(change.device_gb)} GB `,
        el("button", { type: "button", class: "apply-change", title: change.set.join(" "), onclick: () => {
          if (generation !== state.generation) return; // never put an older config back (the list is cleared then)
          state.config = change.config;
          message("#config-message", `applied: ${change.change} (${change.set.join(", ")})`);
          renderForm();
          changed();
          runEstimate();
        } }, "apply")));
    }
  } catch (error) {
    if (generation !== state.generation) return;
    panel.dataset.state = "done";
    message("#estimate-result", error.message, true);
  }
}
$("#estimate-run").addEventListener("click", runEstimate);

// ------------------------------------------------------------------------------------------- dataset
// caption edits not saved yet: nothing replaces or leaves the page without asking
const unsavedCaptions = () => [...document.querySelectorAll("#inspect-table textarea.caption")].filter((t) => t.value !== t.dataset.saved).length;
window.addEventListener("beforeunload", (event) => {
  if (unsavedCaptions()) { event.preventDefault(); event.returnValue = ""; }
});
$("#inspect").addEventListener("click", async () => {
  const unsaved = unsavedCaptions();
  if (unsaved && !confirm(`${unsaved} caption edit(s) not saved. Inspect again and lose them?`)) return;
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

function captionEditor(file) {
  if (file.caption_text === null) return el("span", { class: "hint" }, "unreadable caption file");
  const text = el("textarea", { rows: "2", class: "caption", placeholder: "no caption yet: write one" });
  text.value = (file.caption_text || "").trim();
  text.dataset.saved = text.value; // an edit differs from this until it is saved
  const save = el("button", { type: "button", class: "save-caption", onclick: async () => {
    try {
      const saved = await api("POST", "/api/caption", { file: file.path, text: text.value });
      save.textContent = "saved";
      save.title = saved.path;
      text.dataset.saved = text.value;
    } catch (error) {
      save.textContent = error.message;
    }
  } }, "Save caption");
  text.addEventListener("input", () => { save.textContent = "Save caption"; });
  return el("div", { class: "caption-edit" }, text, save);
}

function renderInspect(report) {
  $("#inspect-empty").hidden = true;
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
    const row = el("tr", { class: file.usable ? "usable" : "skipped", dataset: { name: file.name } });
    for (const problem of file.problems) {
      // a missing caption has a fix here: the caption cell of its row
      const fix = /caption/.test(problem) && file.usable ? el("button", { type: "button", onclick: () => {
        row.scrollIntoView({ block: "center" });
        $("textarea", row).focus();
      } }, "write one") : null;
      problems.append(el("li", {}, `${file.name}: ${problem} `, fix));
    }
    const meta = file.metadata || {};
    const thumbs = el("td", { class: "thumbnails" });
    file.thumbnails.forEach((frames, index) => {
      thumbs.append(el("div", { class: "thumbs", title: `clip ${index + 1}` },
        frames.map((src, n) => el("img", { src, alt: `${file.name} clip ${index + 1} ${["first", "middle", "last"][n]} frame` }))));
    });
    if (file.clips.length > file.thumbnails.length && file.thumbnails.length) {
      thumbs.append(el("div", { class: "hint" }, `+${file.clips.length - file.thumbnails.length} more clip(s)`));
    }
    row.append(  // the problems beside the name: a wide table never hides them off screen
      el("td", { title: file.path }, file.name),
      el("td", { class: "problems" }, file.problems.join("; ")),
      el("td", {}, meta.kind || "-"),
      el("td", {}, meta.kind === "video" ? `${meta.duration.toFixed(2)} s` : "-"),
      el("td", {}, meta.fps ? meta.fps.toFixed(2) : "-"),
      el("td", {}, meta.frames ? String(meta.frames) : "-"),
      el("td", {}, meta.width ? `${meta.width}x${meta.height}` : "-"),
      el("td", {}, file.bucket ? `${file.bucket.width}x${file.bucket.height}` : "-"),
      el("td", {}, file.clips.length ? `${file.clips.length} × ${file.clips[0].length} frames` : "-"),
      el("td", { class: "caption-cell" }, file.usable ? captionEditor(file) : "-"),
      thumbs);
    const titles = [...document.querySelectorAll("#inspect-table thead th")].map((th) => th.textContent);
    [...row.children].forEach((cell, n) => { cell.dataset.label = titles[n]; }); // the column's name on a phone's cards
    body.append(row);
  }
  if (!problems.children.length) problems.append(el("li", { class: "none" }, "none"));
}

// ------------------------------------------------------------------------------------------- runs
function workspaceDir() {
  return state.config.workspace_dir || state.schema.properties.workspace_dir.default;
}
// ------------------------------------------------------------------------------------------- the job queue
$("#queue-add").addEventListener("click", async () => {
  try {
    const job = await api("POST", "/api/queue", { config: state.config, name: state.source || "config" });
    message("#train-message", `queued ${job.name} (job ${job.id})`);
    $("#train-errors").replaceChildren();
    await refreshQueue();
  } catch (error) {
    message("#train-message", error.message, true);
    $("#train-errors").replaceChildren(...((error.data && error.data.errors) || []).map((e) => el("li", {}, e.loc ? `${e.loc}: ${e.msg}` : e.msg)));
  }
});
async function refreshQueue() {
  const { jobs } = await api("GET", "/api/queue");
  $("#queue-empty").hidden = jobs.length > 0;
  const act = (url, body) => async () => {
    try { await api("POST", url, body); } catch (error) { message("#train-message", error.message, true); }
    refreshQueue();
  };
  $("#queue-table tbody").replaceChildren(...jobs.map((job) => el("tr", { dataset: { job: job.id, state: job.state } },
    el("td", {}, job.name),
    el("td", { class: "job-state" }, job.state === "started" ? job.run_state || "started" : job.state),
    el("td", {}, job.run ? el("a", { href: "#", class: "job-run", onclick: (event) => {
      event.preventDefault(); // show this job's run below
      remember({ run: job.run, workspace: null });
      pollRun();
    } }, job.run.split(/[\\/]/).pop()) : "-"),
    el("td", {}, when(job.added)),
    el("td", {}, when(job.started)),
    el("td", {}, job.state !== "queued" ? "" : [
      el("button", { type: "button", class: "job-up", "aria-label": `move ${job.name} up`, onclick: act("/api/queue/move", { id: job.id, offset: -1 }) }, "↑"),
      el("button", { type: "button", class: "job-down", "aria-label": `move ${job.name} down`, onclick: act("/api/queue/move", { id: job.id, offset: 1 }) }, "↓"),
      el("button", { type: "button", class: "job-cancel", onclick: act("/api/queue/cancel", { id: job.id }) }, "cancel")]))));
}

async function refreshRuns() {
  refreshQueue().catch(() => {});
  try {
    const listed = await api("POST", "/api/runs", { workspace: view.workspace || workspaceDir() });
    state.runs = listed.runs;
    $("#runs-workspace").textContent = listed.workspace;
    renderRuns();
  } catch (error) {
    message("#train-message", error.message, true);
  }
}
const when = (seconds) => (seconds ? new Date(seconds * 1000).toLocaleString() : "-");
function renderRuns() {
  const body = $("#runs-table tbody");
  body.replaceChildren(...state.runs.map((run) => {
    const compare = el("input", { type: "checkbox", class: "compare", title: "overlay on the chart", "aria-label": `compare ${run.id} on the chart`,
      checked: view.compare === run.path, disabled: view.run === run.path, onchange: (e) => {
        remember({ compare: e.target.checked ? run.path : null });
        renderRuns();
        pollRun();
      } });
    return el("tr", { class: view.run === run.path ? "selected" : "", dataset: { path: run.path, state: run.state },
      onclick: (e) => { if (e.target.type !== "checkbox") { remember({ run: run.path }); renderRuns(); pollRun(); } } },
    el("td", {}, el("a", { href: "#", onclick: (e) => e.preventDefault() }, run.id)),
    el("td", { class: "run-state" }, run.state),
    el("td", {}, run.total_steps ? `${run.step} / ${run.total_steps}` : "-"),
    el("td", {}, when(run.started)),
    el("td", {}, compare));
  }));
  $("#runs-empty").hidden = state.runs.length > 0;
  if (!view.run && state.runs.length) remember({ run: state.runs[0].path });
}

function updateButtons() {
  const run = state.run || {};
  // the run shown is as fresh as its last poll; the list may be a poll older (a stopped run still "training")
  const anyRunning = state.runs.some((r) => r.running && r.path !== run.path) || run.running;
  $("#start-training").disabled = !state.touched || !state.valid || anyRunning;
  $("#start-hint").textContent = !state.touched ? "load or edit a config first" : !state.valid
    ? "fix the config's problems first (Config page)" : anyRunning ? "a run is training: stop it first" : "";
  $("#resume-run").disabled = !run.resumable || anyRunning;
  $("#stop-training").disabled = !run.running;
  for (const id of ["#sample-now", "#backup-now", "#save-now"]) $(id).disabled = !(run.running && run.state === "training");
}

$("#start-training").addEventListener("click", async () => {
  try {
    const started = await api("POST", "/api/train/start", { config: state.config });
    remember({ run: started.path, workspace: null });
    message("#train-message", `run ${started.run} started (pid ${started.pid}) in ${started.path}`);
    $("#train-errors").replaceChildren();
    await refreshRuns();
    pollRun();
  } catch (error) {
    message("#train-message", error.message, true);
    $("#train-errors").replaceChildren(...((error.data && error.data.errors) || []).map((e) => el("li", {}, e.loc ? `${e.loc}: ${e.msg}` : e.msg)));
  }
});
async function runAction(url, body, done) {
  try {
    const answer = await api("POST", url, body);
    message("#train-message", done(answer));
    await refreshRuns();
    pollRun();
  } catch (error) {
    message("#train-message", error.message, true);
  }
}
$("#stop-training").addEventListener("click", () => runAction("/api/train/stop", { path: view.run },
  (a) => `stop requested (Ctrl-C to pid ${a.signalled}): the step finishes, then a backup and the model are written`));
$("#resume-run").addEventListener("click", () => runAction("/api/runs/resume", { path: view.run },
  (a) => `run ${a.run} resumed from its newest backup (pid ${a.pid})`));
for (const [id, action] of [["#sample-now", "sample"], ["#backup-now", "backup"], ["#save-now", "save"]]) {
  $(id).addEventListener("click", () => runAction("/api/runs/ask", { path: view.run, action },
    () => `${action} asked for: the run does it after the step in progress`));
}
$("#watch").addEventListener("click", async () => {
  try {
    const watched = await api("POST", "/api/watch", { workspace: $("#watch-path").value });
    remember({ run: watched.workspace, workspace: $("#watch-path").value });
    message("#train-message", `watching ${watched.workspace}`);
    await refreshRuns();
    pollRun();
  } catch (error) {
    message("#train-message", error.message, true);
  }
});

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  seconds = Math.round(seconds);
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  return h ? `${h}h ${m}m ${s}s` : m ? `${m}m ${s}s` : `${s}s`;
}

function drawChart(canvas, lines, yTitle, logScale = false) {
  // lines: [{series: [[step, value], ...], color, label}]; axes with titles, a grid, drawn by hand (no library)
  canvas.width = Math.max(200, canvas.parentElement.clientWidth - 24);
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  canvas.dataset.points = String(lines.length ? lines[0].series.length : 0);
  canvas.dataset.steps = JSON.stringify(lines.length ? lines[0].series.map((p) => p[0]) : []);
  context.font = "11px sans-serif";
  context.fillStyle = "#667";
  const all = lines.flatMap((line) => line.series);
  if (!all.length) { context.fillText("no data yet", 10, 20); return; }
  const left = 72, right = 12, top = 10, bottom = 34;
  const value = (v) => (logScale ? Math.log10(Math.max(v, 1e-30)) : v);
  let [minX, maxX] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [minY, maxY] = [Math.min(...all.map((p) => value(p[1]))), Math.max(...all.map((p) => value(p[1])))];
  if (maxX === minX) maxX = minX + 1;
  if (maxY === minY) { const pad = Math.abs(maxY) * 0.1 || 0.5; maxY += pad; minY -= pad; }
  const x = (s) => left + ((s - minX) / (maxX - minX)) * (width - left - right);
  const y = (v) => top + (1 - (v - minY) / (maxY - minY)) * (height - top - bottom);
  const label = (v) => (logScale ? Number(10 ** v).toExponential(1) : String(Number(v.toPrecision(3))));
  context.strokeStyle = "#e4e7ee";
  context.lineWidth = 1;
  for (let i = 0; i <= 4; i++) { // grid and tick labels
    const gy = top + (i / 4) * (height - top - bottom);
    context.beginPath(); context.moveTo(left, gy); context.lineTo(width - right, gy); context.stroke();
    const tick = label(maxY - (i / 4) * (maxY - minY));
    context.fillText(tick, left - 5 - context.measureText(tick).width, gy + 4);
    const gx = left + (i / 4) * (width - left - right);
    context.beginPath(); context.moveTo(gx, top); context.lineTo(gx, height - bottom); context.stroke();
    const step = String(Math.round(minX + (i / 4) * (maxX - minX)));
    context.fillText(step, Math.min(gx - context.measureText(step).width / 2, width - right - context.measureText(step).width), height - bottom + 13);
  }
  context.fillStyle = "#334";
  context.fillText("step", left + (width - left - right) / 2 - 10, height - 4);
  context.save();
  context.translate(11, top + (height - top - bottom) / 2 + 14);
  context.rotate(-Math.PI / 2);
  context.fillText(yTitle, 0, 0);
  context.restore();
  for (const line of [...lines].reverse()) { // the run shown is drawn last, on top of the one compared
    context.strokeStyle = line.color;
    context.lineWidth = 1.5;
    context.beginPath();
    line.series.forEach((p, i) => (i ? context.lineTo(x(p[0]), y(value(p[1]))) : context.moveTo(x(p[0]), y(value(p[1])))));
    context.stroke();
    if (line.series.length === 1) { context.fillStyle = line.color; context.fillRect(x(line.series[0][0]) - 2, y(value(line.series[0][1])) - 2, 4, 4); }
  }
}

let pollTimer = null;
let polling = false;
async function pollRun() {
  clearTimeout(pollTimer);
  if (polling) return;
  polling = true;
  refreshQueue().catch(() => {}); // a queued job may have started or ended
  try {
    const run = view.run ? await api("GET", `/api/run?path=${encodeURIComponent(view.run)}`) : await api("GET", "/api/run");
    let other = null;
    if (view.compare && view.compare !== view.run) {
      other = await api("GET", `/api/run?path=${encodeURIComponent(view.compare)}`).catch(() => null);
    }
    renderRun(run, other);
    const listed = state.runs.find((r) => r.path === run.path);
    if (listed && (listed.state !== run.state || listed.step !== run.step)) refreshRuns();
  } catch (error) {
    if (error.status === 404 && view.run) remember({ run: null }); // the run's folder is gone: show the newest
    $("#run-state").textContent = `(${error.message})`;
  } finally {
    polling = false;
  }
  if ($("#page-training").classList.contains("active")) pollTimer = setTimeout(pollRun, 1000);
}

const link = (path, text) => el("a", { href: `/api/file?path=${encodeURIComponent(path)}`, target: "_blank" }, text || path);
// a model file is downloaded under its own name (a browser cannot show it)
const download = (path) => el("a", { href: `/api/file?path=${encodeURIComponent(path)}`, download: path.split(/[\\/]/).pop() }, path);

// Samples over time: one row per prompt, a slider across the steps it was sampled at (it follows the newest until
// moved), and the compared run's sample of the same prompt at the nearest step beside it.
let shownSamples = null; // the last run and compared run rendered, for a slider moved between polls
function samplesByPrompt(samples) {
  const rows = new Map(); // a prompt's text, or its place in `samples` when it has none -> its samples by step
  for (const sample of samples) {
    const key = sample.prompt || (sample.index !== null ? `sample ${sample.index + 1}` : sample.name);
    if (!rows.has(key)) rows.set(key, []);
    rows.get(key).push(sample);
  }
  const order = (s) => s.step ?? s.epoch ?? Infinity;
  for (const list of rows.values()) list.sort((a, b) => order(a) - order(b) || a.modified - b.modified);
  return rows;
}
const sampleWhen = (s) => (s.step !== null ? `step ${s.step}` : s.epoch !== null ? `epoch ${s.epoch}` : s.name) + (s.asked ? " (asked for)" : "");
function showSample(figure, sample, runId) {
  const url = `${sample.url}&v=${sample.modified}`;
  const shown = `${url} ${runId}`;
  if (figure.dataset.shown === shown) return; // a video is replaced only when another file is shown (no flicker each poll)
  Object.assign(figure.dataset, { shown, path: sample.path, url, name: sample.name, step: sample.step ?? "" });
  figure.replaceChildren(
    el("video", { src: url, controls: true, loop: true, muted: true, preload: "auto", playsinline: true }),
    el("figcaption", {}, el("strong", {}, `${runId ? runId + " · " : ""}${sampleWhen(sample)}`), el("br"),
      sample.prompt ? `“${sample.prompt}”` : sample.name));
}
function renderSamples(run, other) {
  shownSamples = { run, other };
  const box = $("#samples");
  const rows = samplesByPrompt(run.samples);
  const theirs = other && other.samples ? samplesByPrompt(other.samples) : new Map();
  for (const row of [...box.querySelectorAll(".prompt-samples")]) if (!rows.has(row.dataset.prompt)) row.remove();
  [...rows.keys()].forEach((key, place) => {
    const list = rows.get(key);
    let row = [...box.querySelectorAll(".prompt-samples")].find((r) => r.dataset.prompt === key);
    if (!row) {
      const slider = el("input", { type: "range", min: 0, step: 1, class: "sample-step", "aria-label": `the step shown for “${key}”`,
        oninput: () => { slider.dataset.follow = +slider.value === +slider.max ? "1" : "0"; renderSamples(shownSamples.run, shownSamples.other); } });
      slider.dataset.follow = "1";
      row = el("section", { class: "prompt-samples", dataset: { prompt: key } },
        el("div", { class: "side-by-side" }, el("figure", { class: "this-run" })),
        el("label", { class: "sample-slider" }, slider, el("output", {})));
    }
    if (box.children[place] !== row) box.insertBefore(row, box.children[place] || null);
    const slider = row.querySelector("input.sample-step");
    slider.max = String(list.length - 1);
    if (slider.dataset.follow === "1" || +slider.value > list.length - 1) slider.value = String(list.length - 1);
    slider.disabled = list.length < 2;
    const chosen = list[+slider.value];
    showSample(row.querySelector("figure.this-run"), chosen, other ? run.id : "");
    row.querySelector("output").textContent = `${sampleWhen(chosen)} · ${+slider.value + 1} of ${list.length}`;
    // the compared run's sample of this prompt nearest the step shown (its runs may sample at other steps)
    const mine = chosen.step ?? chosen.epoch ?? 0;
    const candidates = theirs.get(key) || [];
    const nearest = candidates.reduce((best, s) => (best && Math.abs((best.step ?? best.epoch ?? 0) - mine) <= Math.abs((s.step ?? s.epoch ?? 0) - mine) ? best : s), null);
    let compared = row.querySelector("figure.compared-run");
    if (!nearest) { if (compared) compared.remove(); return; }
    if (!compared) row.querySelector(".side-by-side").append(compared = el("figure", { class: "compared-run" }));
    showSample(compared, nearest, other.id);
  });
  const none = box.querySelector(".none");
  if (!rows.size && !none) box.append(el("p", { class: "none hint" }, "no samples yet"));
  if (rows.size && none) none.remove();
}

function renderRun(run, other) {
  state.run = run.workspace ? run : null;
  updateButtons();
  $("#run-workspace").textContent = run.workspace || "none (start a run, or watch a workspace)";
  if (!run.workspace) return;
  if (!view.run) remember({ run: run.path });
  $("#run-id").textContent = run.id === "." ? "" : run.id;
  const progress = run.progress || {};
  let stateText = run.state;
  if (run.state === "starting") stateText = "starting (surveying data, encoding, loading the model)";
  if (run.state === "failed") stateText = `failed (exit code ${run.exit_code}; see the log)`;
  if (run.state === "ended without finishing") stateText += " (see the log; Resume continues from the newest backup)";
  $("#run-state").textContent = stateText;
  $("#run-state").dataset.state = run.state;
  const total = progress.total_steps;
  $("#run-step").textContent = total ? `${progress.step} / ${total} (${Math.floor((100 * progress.step) / total)}%)` : "-";
  $("#run-progress").max = total || 1;
  $("#run-progress").value = progress.step || 0;
  $("#run-epoch").textContent = progress.epoch ? `${progress.epoch} / ${run.epochs}` : "-";
  $("#run-speed").textContent = progress.seconds_per_step ? `${progress.seconds_per_step.toFixed(2)} s/step` : run.running ? "measuring…" : "-";
  $("#run-elapsed").textContent = duration(progress.elapsed_seconds);
  $("#run-eta").textContent = run.running && progress.eta_seconds !== undefined
    ? (progress.eta_seconds === null ? "measuring…" : duration(progress.eta_seconds))
    : run.state === "done" ? "done" : "-";
  const memory = progress.memory || {};
  const memoryParts = [];
  if (run.live_rss_mb) memoryParts.push(`RAM ${run.live_rss_mb} MB now`);
  else if (memory.rss_mb !== undefined) memoryParts.push(`RAM ${memory.rss_mb} MB`);
  if (memory.peak_rss_mb !== undefined) memoryParts.push(`peak ${memory.peak_rss_mb} MB`);
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
  const lossLines = [{ series: loss, color: "#2b6cb0", label: run.id }];
  const validation = scalars["loss/validation_step/total_average"];  // VALIDATION concepts' clips, never trained on
  if (validation && validation.length) lossLines.push({ series: validation, color: "#805ad5", label: `${run.id} validation` });
  const lrLines = [{ series: lrTags.length ? scalars[lrTags[0]] : [], color: "#c05621", label: run.id }];
  if (other && other.scalars) {
    lossLines.push({ series: other.scalars.loss || [], color: "#38a169", label: other.id });
    const otherLr = Object.keys(other.scalars).find((tag) => tag === "lr" || tag.startsWith("lr/"));
    lrLines.push({ series: otherLr ? other.scalars[otherLr] : [], color: "#38a169", label: other.id });
  }
  // the swatch carries the line's colour, the text the page's (readable on either background)
  $("#chart-legend").replaceChildren(...lossLines.map((line) => el("span", {}, el("b", { style: `color:${line.color}`, "aria-hidden": "true" }, "■ "), line.label)));
  drawChart($("#loss-chart"), lossLines, "loss");
  drawChart($("#lr-chart"), lrLines, "learning rate");
  $("#loss-chart").dataset.compared = String(other && other.scalars && other.scalars.loss ? other.scalars.loss.length : 0);

  renderSamples(run, other);
  $("#backups").replaceChildren(...run.backups.map((backup) => el("li", { dataset: { name: backup.name } },
    "backup ", link(`${backup.path}/backup.json`, backup.name), backup.info && backup.info.written ? ` — written ${backup.info.written}` : "")));
  if (!run.backups.length) $("#backups").append(el("li", { class: "none" }, "no backups yet"));
  $("#outputs").replaceChildren(...run.saves.map((path) => el("li", { class: "save" }, "saved ", download(path))),
    ...run.outputs.map((path) => el("li", { class: "output" }, "model ", download(path))));
  const result = run.result;
  $("#run-result").replaceChildren(...(result && !run.running ? [el("p", {},
    `${result.interrupted ? "Stopped early (Resume continues it)" : "Finished"} after ${result.steps} steps.`)] : []));
  // the page shows the log's end; the whole file opens in its own tab, the history in TensorBoard
  $("#whole-log").hidden = !run.log_file;
  if (run.log_file) $("#whole-log").href = `/api/file?path=${encodeURIComponent(run.log_file)}`;
  $("#tensorboard-hint").hidden = !run.tensorboard_dir;
  $("#tensorboard-command").textContent = run.tensorboard_dir ? `tensorboard --logdir "${run.tensorboard_dir}"` : "";
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
  if (presets.includes("#wan 2.1 LoRA")) $("#preset-select").value = "#wan 2.1 LoRA";
  renderGroups();
  const working = await api("GET", "/api/working");
  if (working.config) {
    state.config = working.config;
    state.source = working.source || "";
    state.touched = true;
    $("#save-path").value = working.save_path || "";
    message("#config-message", `the config as last edited${state.source ? ` (from ${state.source})` : ""}`);
  }
  renderForm();
  if (state.touched) await validateNow();
  else { showErrors(); updateButtons(); }
  showPage(view.page || "config");
  await refreshRuns();
  document.body.dataset.ready = "1";
})();
window.addEventListener("resize", () => { if (state.run) pollRun(); });

// Path pickers: the folders the UI may browse (`motiontune ui --browse`), names only; a folder opens, a file is
// chosen, "Choose this folder" takes the folder shown. The chosen path goes into the field as if typed.
let pickerFor = null;
const pickButton = (input, label) => el("button", { type: "button", class: "pick", title: "browse", "aria-label": `browse for ${label}`,
  onclick: () => openPicker(input) }, "…");
async function openPicker(input) {
  pickerFor = input;
  $("#picker").showModal();
  await showFolder(input.value.trim());
}
async function showFolder(path) {
  let listed;
  try {
    listed = await api("GET", `/api/browse?path=${encodeURIComponent(path)}`);
  } catch (error) {
    const parent = path.replace(/[\\/][^\\/]*[\\/]?$/, "");
    if (path && error.status === 404 && parent && parent !== path) return showFolder(parent); // a file, or not made yet
    if (path) return showFolder(""); // outside what may be browsed: from the top
    $("#picker-where").textContent = error.message;
    return;
  }
  $("#picker").dataset.path = listed.path || "";
  $("#picker-where").textContent = listed.path || "the folders this UI may browse";
  $("#picker-up").disabled = !listed.path;
  $("#picker-choose").disabled = !listed.path;
  $("#picker-list").replaceChildren(...listed.entries.map((entry) => el("li", {},
    el("button", { type: "button", dataset: { path: entry.path, folder: entry.folder ? "1" : "" },
      onclick: () => (entry.folder ? showFolder(entry.path) : choosePath(entry.path)) },
    entry.folder ? `📁 ${entry.name}/` : entry.name))));
  if (!listed.entries.length) $("#picker-list").append(el("li", { class: "hint" }, "(empty)"));
  $("#picker-more").hidden = !listed.more;
  $("#picker-more").textContent = `and ${listed.more} more: type the path`;
  $("#picker").dataset.parent = listed.parent || "";
}
function choosePath(path) {
  $("#picker").close();
  pickerFor.value = path;
  pickerFor.dispatchEvent(new Event("input", { bubbles: true }));
  pickerFor.dispatchEvent(new Event("change", { bubbles: true }));
  pickerFor.focus();
}
$("#picker-up").addEventListener("click", () => showFolder($("#picker").dataset.parent));
$("#picker-choose").addEventListener("click", () => choosePath($("#picker").dataset.path));
$("#picker-cancel").addEventListener("click", () => $("#picker").close());
for (const [id, label] of [["#load-path", "a config file"], ["#dataset-folder", "a dataset folder"], ["#watch-path", "a workspace"]]) {
  $(id).after(pickButton($(id), label));
}
