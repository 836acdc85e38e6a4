/* dino-vos report: overview, sequence and attention pages of one static folder.
 * Data come from data/*.js (script tags work from file://, fetch does not); pictures are
 * relative files. The URL hash names the page and the frame: #seq=NAME&frame=12. */
(function () {
  "use strict";

  var REPORT = window.DINO_VOS_REPORT;
  var app = document.getElementById("app");
  var crumb = document.getElementById("crumb");
  var RUN_COLOURS = ["#1f5fbf", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
  var STATS = ["J&F", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"];
  var loaded = {};
  var page = null; // {kind, slug, seek(t), stop()}

  function el(tag, attrs) {
    var node = document.createElement(tag);
    var key;
    for (key in attrs || {}) {
      if (key === "text") node.textContent = attrs[key];
      else if (key === "class") node.className = attrs[key];
      else if (key.slice(0, 2) === "on") node.addEventListener(key.slice(2), attrs[key]);
      else node.setAttribute(key, attrs[key]);
    }
    for (var i = 2; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function svg(tag, attrs) {
    var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (var key in attrs) node.setAttribute(key, attrs[key]);
    return node;
  }

  function fmt(value) {
    return value === null || value === undefined || isNaN(value) ? "" : value.toFixed(3);
  }

  function signed(value) {
    return value === null || isNaN(value) ? "" : (value > 0 ? "+" : "") + value.toFixed(3);
  }

  function stat(stats, key) {
    if (!stats) return null;
    if (key === "J&F") return (stats["J-Mean"] + stats["F-Mean"]) / 2;
    var value = stats[key];
    return value === null || value === undefined ? null : value;
  }

  function pad(t) {
    return ("0000" + t).slice(-5);
  }

  function params() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      if (!part) return;
      var i = part.indexOf("=");
      var key = i < 0 ? part : part.slice(0, i);
      out[decodeURIComponent(key)] = i < 0 ? "" : decodeURIComponent(part.slice(i + 1));
    });
    return out;
  }

  function setHash(kind, slug, t) {
    var hash = "#" + kind + "=" + encodeURIComponent(slug) + "&frame=" + t;
    if (location.hash !== hash) location.replace(hash);
  }

  function loadSequence(slug, done) {
    if (loaded[slug]) return done(loaded[slug]);
    window.DINO_VOS_SEQUENCE = undefined;
    var script = el("script", { src: "data/seq/" + encodeURIComponent(slug) + ".js" });
    script.addEventListener("load", function () {
      loaded[slug] = window.DINO_VOS_SEQUENCE;
      done(loaded[slug]);
    });
    script.addEventListener("error", function () {
      app.replaceChildren(el("p", { class: "error", text: "No data for " + slug + " in this report." }));
    });
    document.head.appendChild(script);
  }

  // ---- overview ------------------------------------------------------------------------------

  function sortableTable(columns, rows, initial) {
    // columns: [{label, key, value(row), render(row)->td, cls, group}], rows: any objects
    var state = { key: initial ? initial.key : null, asc: initial ? initial.asc : true };
    var table = el("table", { class: "grid" });
    var tbody = el("tbody");
    var headers = [];
    function draw() {
      var column = columns.filter(function (c) { return c.key === state.key; })[0];
      var sorted = rows.slice();
      if (column) {
        sorted.sort(function (a, b) {
          var x = column.value(a), y = column.value(b);
          var missingX = x === null || x === undefined || (typeof x === "number" && isNaN(x));
          var missingY = y === null || y === undefined || (typeof y === "number" && isNaN(y));
          if (missingX || missingY) return missingX === missingY ? 0 : missingX ? 1 : -1;
          var order = typeof x === "string" ? x.localeCompare(y) : x - y;
          return state.asc ? order : -order;
        });
      }
      headers.forEach(function (th) {
        th.classList.toggle("sorted", th.dataset.key === state.key);
        th.classList.toggle("asc", th.dataset.key === state.key && state.asc);
      });
      tbody.replaceChildren.apply(tbody, sorted.map(function (row) { return row.__tr; }));
    }
    rows.forEach(function (row) {
      var tr = el("tr", row.__attrs || {});
      columns.forEach(function (c) {
        var td = c.render ? c.render(row) : el("td", { class: "num", text: fmt(c.value(row)) });
        if (c.group) td.classList.add("group-start");
        tr.appendChild(td);
      });
      row.__tr = tr;
    });
    var headRow = el("tr");
    columns.forEach(function (c) {
      var th = el("th", { class: "sortable" + (c.group ? " group-start" : ""), text: c.label, title: "sort by " + c.title });
      th.dataset.key = c.key;
      th.addEventListener("click", function () {
        if (state.key === c.key) state.asc = !state.asc;
        else { state.key = c.key; state.asc = c.ascending !== false; }
        draw();
      });
      headers.push(th);
      headRow.appendChild(th);
    });
    table.appendChild(el("thead", {}, headRow));
    table.appendChild(tbody);
    table.__prepend = function (tr) { table.tHead.appendChild(tr); };
    draw();
    return table;
  }

  function runsTable() {
    var table = el("table", { class: "grid runs" });
    var head = el("tr", {}, el("th", { text: "run" }), el("th", { text: "kind" }));
    STATS.forEach(function (s) { head.appendChild(el("th", { text: s === "J&F" ? "J&F-Mean" : s })); });
    head.appendChild(el("th", { text: "settings" }));
    table.appendChild(el("thead", {}, head));
    var body = el("tbody");
    REPORT.runs.forEach(function (run, r) {
      var tr = el("tr", { "data-run": r },
        el("td", {}, el("span", { class: "swatch", style: "background:" + RUN_COLOURS[r % RUN_COLOURS.length] }), run.label),
        el("td", { text: run.kind }));
      STATS.forEach(function (s) {
        var value = run.global ? (s === "J&F" ? run.global["J&F-Mean"] : run.global[s]) : null;
        tr.appendChild(el("td", { class: "num", "data-stat": s, text: fmt(value) }));
      });
      tr.appendChild(el("td", { class: "small muted", text: settingsText(run.settings), title: run.path }));
      body.appendChild(tr);
    });
    table.appendChild(body);
    return table;
  }

  function settingsText(settings) {
    if (!settings) return "";
    var parts = [];
    if (settings.backbone) parts.push(settings.backbone);
    if (settings.resize) parts.push(typeof settings.resize === "string" ? settings.resize : JSON.stringify(settings.resize));
    var p = settings.propagation;
    if (p) {
      ["topk", "context", "radius", "temperature", "upsample"].forEach(function (k) {
        if (p[k] !== undefined && p[k] !== null) parts.push(k + " " + p[k]);
      });
    }
    if (settings.shift_ensemble && settings.shift_ensemble > 1) parts.push("shift-ensemble " + settings.shift_ensemble);
    if (settings.max_frames) parts.push("first " + settings.max_frames + " frames");
    if (settings.note) parts.push(settings.note);
    return parts.join(", ");
  }

  function objectTable() {
    var runs = REPORT.runs;
    var scored = runs.map(function (run, r) {
      return REPORT.rows.some(function (row) { return row.runs[r]; });
    });
    var shown = runs.map(function (_, r) { return r; }).filter(function (r) { return scored[r]; });
    var columns = [
      { label: "sequence", key: "seq", title: "sequence", ascending: true,
        value: function (row) { return row.sequence; },
        render: function (row) { return el("td", {}, el("a", { href: "#seq=" + encodeURIComponent(row.slug) + "&frame=0", text: row.sequence })); } },
      { label: "object", key: "obj", title: "object id", value: function (row) { return row.object; },
        render: function (row) { return el("td", { class: "num", text: String(row.object) }); } }
    ];
    var first = shown[0];
    shown.slice(1).forEach(function (r) {
      columns.push({ label: "\u0394 J&F", key: "d" + r, title: "difference: " + runs[r].label + " - " + runs[first].label,
        group: true, ascending: false,
        value: function (row) { var a = stat(row.runs[first], "J&F"), b = stat(row.runs[r], "J&F"); return a === null || b === null ? null : b - a; },
        render: function (row) {
          var a = stat(row.runs[first], "J&F"), b = stat(row.runs[r], "J&F");
          var d = a === null || b === null ? null : b - a;
          return el("td", { class: "num delta " + (d > 0 ? "up" : d < 0 ? "down" : ""), "data-run": r, "data-stat": "delta", text: signed(d) });
        } });
    });
    if (shown.length > 1) {
      columns.push({ label: "|largest \u0394|", key: "maxd", title: "largest absolute change of J&F", ascending: false,
        value: function (row) {
          var base = stat(row.runs[first], "J&F"), best = null;
          shown.slice(1).forEach(function (r) {
            var v = stat(row.runs[r], "J&F");
            if (base !== null && v !== null && (best === null || Math.abs(v - base) > best)) best = Math.abs(v - base);
          });
          return best;
        } });
    }
    shown.forEach(function (r) {
      STATS.forEach(function (s, i) {
        columns.push({ label: s, key: "r" + r + ":" + s, title: s + " of " + runs[r].label, group: i === 0, ascending: s.indexOf("Decay") >= 0,
          value: function (row) { return stat(row.runs[r], s); },
          render: function (row) { return el("td", { class: "num", "data-run": r, "data-stat": s, text: fmt(stat(row.runs[r], s)) }); } });
      });
    });
    REPORT.rows.forEach(function (row) {
      row.__attrs = { class: "clickable", "data-sequence": row.sequence, "data-object": row.object,
        onclick: function (event) {
          if (event.target.tagName !== "A") location.hash = "#seq=" + encodeURIComponent(row.slug) + "&frame=0";
        } };
    });
    var initial = shown.length > 1 ? { key: "maxd", asc: false } : null;
    var table = sortableTable(columns, REPORT.rows, initial);
    table.classList.add("objects-table");
    // a first header row naming the column groups
    var groups = el("tr");
    groups.appendChild(el("th", { colspan: 2, text: "" }));
    if (shown.length > 1) groups.appendChild(el("th", { colspan: shown.length, class: "group-start", text: "change vs " + runs[first].label }));
    shown.forEach(function (r) {
      groups.appendChild(el("th", { colspan: STATS.length, class: "group-start" },
        el("span", { class: "swatch", style: "background:" + RUN_COLOURS[r % RUN_COLOURS.length] }), runs[r].label));
    });
    table.tHead.insertBefore(groups, table.tHead.firstChild);
    return table;
  }

  function sweepSection(sweep) {
    var metrics = ["J&F-Mean", "J-Mean", "F-Mean"];
    var columns = sweep.parameters.map(function (name) {
      return { label: name, key: "p:" + name, title: name, value: function (row) { return row[name]; },
        render: function (row) { return el("td", { class: "num", text: String(row[name]) }); } };
    });
    metrics.forEach(function (m, i) {
      columns.push({ label: m, key: m, title: m, group: i === 0, ascending: false, value: function (row) { return row[m]; } });
    });
    columns.push({ label: "seconds", key: "seconds", title: "seconds", value: function (row) { return row.seconds; },
      render: function (row) { return el("td", { class: "num", text: row.seconds === null ? "" : row.seconds.toFixed(1) }); } });
    columns.push({ label: "status", key: "status", title: "status", value: function (row) { return row.status; },
      render: function (row) { return el("td", { text: row.status }); } });
    var rows = sweep.rows.map(function (row) { return Object.assign({}, row); });
    var body = el("div", { class: "sweep" }, sortableTable(columns, rows, { key: "J&F-Mean", asc: false }));
    if (sweep.heatmap) body.appendChild(el("img", { src: sweep.heatmap, alt: "sweep heat map of " + sweep.label }));
    return el("section", { class: "sweep-section" }, el("h2", { text: "Sweep: " + sweep.label }), body);
  }

  function overview() {
    crumb.textContent = "";
    document.title = "dino-vos report";
    var parts = [el("h1", { text: "Runs" }), el("div", { class: "wide" }, runsTable())];
    REPORT.sweeps.forEach(function (sweep) { parts.push(sweepSection(sweep)); });
    if (REPORT.rows.length) {
      parts.push(el("h2", { text: "Per sequence and object" }));
      parts.push(el("p", { class: "muted small", text: REPORT.runs.length > 1
        ? "Sorted by the largest change of J&F against the first run; click a header to sort, a row to open the sequence."
        : "Click a header to sort, a row to open the sequence." }));
      parts.push(el("div", { class: "wide" }, objectTable()));
    }
    var unscored = REPORT.sequences.filter(function (s) { return !s.groundTruth; });
    if (unscored.length) {
      parts.push(el("h2", { text: "Sequences without ground truth" }));
      parts.push(el("div", { class: "cards" }, ...unscored.map(function (s) {
        return el("a", { href: "#seq=" + encodeURIComponent(s.slug) + "&frame=0", class: "sequence-link", text: s.name + " (" + s.frames + " frames)" });
      })));
    }
    if (REPORT.attention.length) {
      parts.push(el("h2", { text: "Attention" }));
      parts.push(el("div", { class: "cards" }, ...REPORT.attention.map(function (a) {
        return el("a", { href: "#attn=" + encodeURIComponent(a.slug) + "&frame=0", class: "attention-link", text: a.name + " (" + a.frames + " frames)" });
      })));
    }
    parts.push(el("p", { class: "muted small", text: "dino-vos " + REPORT.version + " \u00b7 opens offline: every file is in this folder." }));
    app.replaceChildren.apply(app, parts);
  }

  // ---- the frame player shared by sequence and attention pages ------------------------------

  function player(count, keyframes, onFrame) {
    var state = { t: 0, timer: null };
    var play = el("button", { id: "play", type: "button", text: "\u25B6 play", title: "play / pause (space)" });
    var slider = el("input", { id: "slider", type: "range", min: 0, max: Math.max(0, count - 1), step: 1, value: 0 });
    var counter = el("span", { id: "counter" });
    var marks = el("div", { class: "marks" });
    keyframes.forEach(function (t) {
      var left = count > 1 ? (100 * t) / (count - 1) : 0;
      marks.appendChild(el("span", { class: "key", style: "left:" + left + "%", title: "keyframe " + t }));
    });
    function seek(t) {
      t = Math.max(0, Math.min(count - 1, Math.round(t)));
      state.t = t;
      slider.value = t;
      onFrame(t, counter);
      for (var ahead = 1; ahead <= 3; ahead++) if (state.preload) state.preload(t + ahead);
    }
    function stop() {
      if (state.timer) clearInterval(state.timer);
      state.timer = null;
      play.textContent = "\u25B6 play";
    }
    function toggle() {
      if (state.timer) return stop();
      if (state.t >= count - 1) seek(0);
      play.textContent = "\u275A\u275A pause";
      state.timer = setInterval(function () {
        if (state.t >= count - 1) return stop();
        seek(state.t + 1);
      }, 100);
    }
    function key(event) {
      if (event.target === slider || event.altKey || event.ctrlKey || event.metaKey) return;
      if (event.key === "ArrowRight") seek(state.t + 1);
      else if (event.key === "ArrowLeft") seek(state.t - 1);
      else if (event.key === "Home") seek(0);
      else if (event.key === "End") seek(count - 1);
      else if (event.key === " ") toggle();
      else return;
      event.preventDefault();
    }
    play.addEventListener("click", toggle);
    slider.addEventListener("input", function () { seek(Number(slider.value)); });
    document.addEventListener("keydown", key);
    var controls = el("div", { class: "controls" }, play,
      el("div", { class: "scrub" }, slider, marks), counter);
    return {
      controls: controls, seek: seek, state: state,
      stop: function () { stop(); document.removeEventListener("keydown", key); }
    };
  }

  // ---- sequence page ------------------------------------------------------------------------

  function meanAt(run, ids, metric, t) {
    if (!run) return null;
    var total = 0, n = 0;
    for (var i = 0; i < ids.length; i++) {
      var obj = run.objects[ids[i]];
      if (!obj) continue;
      var v = obj[metric][t];
      if (v === null || v === undefined) return null;
      total += v; n++;
    }
    return n ? total / n : null;
  }

  function chart(metric, title, data, runs, shownIds, count, onPick) {
    var width = 1000, height = 100;
    var box = svg("svg", { viewBox: "0 0 " + width + " " + height, preserveAspectRatio: "none", class: "curve", "data-metric": metric });
    function x(t) { return count > 1 ? (width * t) / (count - 1) : width / 2; }
    function y(v) { return height - 2 - v * (height - 4); }
    [0.25, 0.5, 0.75].forEach(function (v) {
      box.appendChild(svg("line", { x1: 0, x2: width, y1: y(v), y2: y(v), stroke: "#e3e7ef", "vector-effect": "non-scaling-stroke" }));
    });
    function redraw() {
      Array.prototype.slice.call(box.querySelectorAll(".series,.key")).forEach(function (n) { n.remove(); });
      var ids = shownIds();
      runs.forEach(function (r) {
        var run = data.runs[r];
        var colour = RUN_COLOURS[r % RUN_COLOURS.length];
        run.keyframes.forEach(function (t) {
          box.appendChild(svg("line", { class: "key", x1: x(t), x2: x(t), y1: 0, y2: height, stroke: "#e0a000", "stroke-dasharray": "3 3", "vector-effect": "non-scaling-stroke" }));
        });
        var d = "", open = false;
        for (var t = 0; t < count; t++) {
          var v = meanAt(run, ids, metric, t);
          if (v === null) { open = false; continue; }
          d += (open ? "L" : "M") + x(t).toFixed(1) + " " + y(v).toFixed(1);
          open = true;
        }
        if (d) box.appendChild(svg("path", { class: "series", d: d, fill: "none", stroke: colour, "stroke-width": 1.6, "vector-effect": "non-scaling-stroke", "data-run": r }));
      });
      box.appendChild(cursor);
    }
    var cursor = svg("line", { class: "cursor", x1: 0, x2: 0, y1: 0, y2: height, stroke: "#111", "stroke-width": 1.2, "vector-effect": "non-scaling-stroke" });
    box.addEventListener("click", function (event) {
      var rect = box.getBoundingClientRect();
      onPick(((event.clientX - rect.left) / rect.width) * (count - 1));
    });
    redraw();
    var plot = el("div", { class: "plot" }, box);
    [1, 0.5, 0].forEach(function (v) {
      plot.appendChild(el("span", { class: "axis", style: "top:" + (100 * (1 - v)).toFixed(0) + "%", text: String(v) }));
    });
    var wrap = el("div", { class: "chart", id: "chart-" + metric }, el("div", { class: "title", text: title }), plot);
    return {
      node: wrap, redraw: redraw,
      move: function (t) { cursor.setAttribute("x1", x(t)); cursor.setAttribute("x2", x(t)); }
    };
  }

  function sequencePage(data, startFrame) {
    var count = data.stems.length;
    var ids = data.objects.map(function (o) { return String(o.id); });
    var hidden = {};
    var view = "masks";
    var k = data.objects.length;
    var runIndexes = data.runs.map(function (run, r) { return run ? r : -1; }).filter(function (r) { return r >= 0; });
    var scoredRuns = runIndexes.filter(function (r) { return Object.keys(data.runs[r].objects).length > 0; });
    crumb.textContent = "\u203A " + data.name;
    document.title = data.name + " \u00b7 dino-vos report";

    function shownIds() { return ids.filter(function (id) { return !hidden[id]; }); }

    var keyframes = [];
    runIndexes.forEach(function (r) { keyframes = keyframes.concat(data.runs[r].keyframes); });

    // panels: ground truth, then every run holding this sequence
    var panels = [];
    function makePanel(label, kind, r) {
      var stage = el("div", { class: "stage", style: "aspect-ratio:" + data.width + "/" + data.height });
      var img = el("img", { class: "frame", alt: data.name + " frame", width: data.width, height: data.height });
      stage.appendChild(img);
      var layers = data.objects.map(function (o, i) {
        var layer = el("div", { class: "layer", "data-object": o.id });
        layer.style.backgroundSize = "100% " + k * 100 + "%";
        layer.style.backgroundPosition = "0 " + (k > 1 ? (100 * i) / (k - 1) : 0) + "%";
        stage.appendChild(layer);
        return layer;
      });
      var score = el("span", { class: "score" });
      var title = el("span", {}, r >= 0 ? el("span", { class: "swatch", style: "background:" + RUN_COLOURS[r % RUN_COLOURS.length] }) : null, label);
      var figure = el("figure", { class: "panel", "data-panel": kind, "data-run": r }, stage, el("figcaption", {}, title, score));
      panels.push({ kind: kind, r: r, img: img, layers: layers, score: score });
      return figure;
    }
    var panelBox = el("div", { class: "panels" });
    if (data.gt.some(Boolean)) panelBox.appendChild(makePanel("ground truth", "gt", -1));
    runIndexes.forEach(function (r) { panelBox.appendChild(makePanel(REPORT.runs[r].label, "run", r)); });

    function sprite(panel, t) {
      if (panel.kind === "gt") return data.gt[t] ? data.base + "/gt/" + pad(t) + ".png" : null;
      var run = data.runs[panel.r];
      if (view === "diff" && run.diff[t]) return data.base + "/diff" + panel.r + "/" + pad(t) + ".png";
      if (view === "diff") return null;
      return run.masks[t] ? data.base + "/run" + panel.r + "/" + pad(t) + ".png" : null;
    }

    var charts = [];
    function show(t, counter) {
      var src = data.base + "/frames/" + pad(t) + ".jpg";
      counter.textContent = "frame " + t + " / " + (count - 1) + " \u00b7 " + data.stems[t] + (keyframes.indexOf(t) >= 0 ? " \u00b7 keyframe" : "");
      panels.forEach(function (panel) {
        if (panel.img.getAttribute("src") !== src) panel.img.setAttribute("src", src);
        var url = sprite(panel, t);
        panel.layers.forEach(function (layer) {
          layer.style.backgroundImage = url ? 'url("' + url + '")' : "none";
          layer.classList.toggle("hidden", !!hidden[layer.dataset.object] || !url);
        });
        if (panel.kind === "run") {
          var run = data.runs[panel.r];
          var j = meanAt(run, shownIds(), "J", t), f = meanAt(run, shownIds(), "F", t);
          panel.score.textContent = j === null ? (Object.keys(run.objects).length ? "not scored" : "") : "J " + fmt(j) + "  F " + fmt(f);
        }
      });
      charts.forEach(function (c) { c.move(t); });
      setHash("seq", data.slug, t);
    }

    var control = player(count, keyframes, show);
    control.state.preload = function (t) {
      if (t < count) new Image().src = data.base + "/frames/" + pad(t) + ".jpg";
    };

    var views = el("div", { class: "views" });
    [["masks", "masks"], ["diff", "difference (FP / FN)"]].forEach(function (v) {
      var input = el("input", { type: "radio", name: "view", value: v[0] });
      if (v[0] === view) input.checked = true;
      if (v[0] === "diff" && !data.gt.some(Boolean)) input.disabled = true;
      input.addEventListener("change", function () { view = v[0]; control.seek(control.state.t); });
      views.appendChild(el("label", {}, input, v[1]));
    });
    var objects = el("div", { class: "objects" }, el("span", { class: "muted", text: "objects " }));
    data.objects.forEach(function (o) {
      var box = el("input", { type: "checkbox", "data-object": o.id });
      box.checked = true;
      box.addEventListener("change", function () {
        hidden[String(o.id)] = !box.checked;
        charts.forEach(function (c) { c.redraw(); });
        control.seek(control.state.t);
      });
      objects.appendChild(el("label", {}, box, el("span", { class: "swatch", style: "background:" + o.colour }), String(o.id)));
    });
    control.controls.appendChild(views);
    control.controls.appendChild(objects);

    var parts = [el("h1", { text: data.name }), control.controls, panelBox];
    if (scoredRuns.length) {
      var pick = function (t) { control.seek(t); };
      charts = [
        chart("J", "J (region) per frame, mean of the shown objects", data, scoredRuns, shownIds, count, pick),
        chart("F", "F (boundary) per frame, mean of the shown objects", data, scoredRuns, shownIds, count, pick)
      ];
      var legend = el("div", { class: "legend small" });
      scoredRuns.forEach(function (r) {
        legend.appendChild(el("span", {}, el("span", { class: "swatch", style: "background:" + RUN_COLOURS[r % RUN_COLOURS.length] }), REPORT.runs[r].label));
      });
      legend.appendChild(el("span", { class: "muted", text: "dashed: keyframes \u00b7 gaps: frames not scored (first, last, keyframes) \u00b7 click a curve to jump" }));
      parts.push(el("div", { class: "charts" }, charts[0].node, charts[1].node, legend));
    } else {
      parts.push(el("p", { class: "muted", text: "No ground truth for this sequence: no per-frame scores." }));
    }
    parts.push(el("p", { class: "muted small", text: "Keys: \u2190 \u2192 frame, space play / pause, Home / End. Difference view: " }, el("span", { class: "swatch", style: "background:rgb(255,64,32)" }), "false positive ", el("span", { class: "swatch", style: "background:rgb(32,160,255)" }), "false negative"));
    app.replaceChildren.apply(app, parts);
    control.seek(startFrame);
    return { kind: "seq", slug: data.slug, seek: control.seek, stop: control.stop };
  }

  // ---- attention page -----------------------------------------------------------------------

  function attentionPage(data, startFrame) {
    var count = data.stems.length;
    crumb.textContent = "\u203A attention \u203A " + data.name;
    document.title = data.name + " attention \u00b7 dino-vos report";
    var tiles = [];
    var grid = el("div", { class: "heads" });
    [["frame", "frames"]].concat(data.maps.map(function (m) { return [m, m]; })).forEach(function (pair) {
      var img = el("img", { alt: pair[0] });
      tiles.push({ folder: pair[1], img: img });
      grid.appendChild(el("figure", { "data-map": pair[0] }, img, el("figcaption", { text: pair[0] })));
    });
    function show(t, counter) {
      counter.textContent = "frame " + t + " / " + (count - 1) + " \u00b7 " + data.stems[t];
      tiles.forEach(function (tile) { tile.img.setAttribute("src", data.base + "/" + tile.folder + "/" + pad(t) + ".jpg"); });
      setHash("attn", data.slug, t);
    }
    var control = player(count, [], show);
    app.replaceChildren(el("h1", { text: "Attention: " + data.name }), control.controls, grid,
      el("p", { class: "muted small", text: "Last-block CLS attention: the mean over heads and each head. Keys: \u2190 \u2192 frame, space play / pause." }));
    control.seek(startFrame);
    return { kind: "attn", slug: data.slug, seek: control.seek, stop: control.stop };
  }

  // ---- routing ------------------------------------------------------------------------------

  function route() {
    var p = params();
    var kind = p.seq !== undefined ? "seq" : p.attn !== undefined ? "attn" : null;
    var slug = kind ? p[kind] : null;
    var frame = Number(p.frame) || 0;
    if (page && page.kind === kind && page.slug === slug) {
      if (page.seek) page.seek(frame);
      return;
    }
    if (page && page.stop) page.stop();
    page = null;
    if (!kind) {
      page = { kind: null, slug: null };
      overview();
      window.scrollTo(0, 0);
      return;
    }
    loadSequence(slug, function (data) {
      if (!data) return;
      page = kind === "seq" ? sequencePage(data, frame) : attentionPage(data, frame);
      window.scrollTo(0, 0);
    });
  }

  if (!REPORT) {
    app.replaceChildren(el("p", { class: "error", text: "data/index.js is missing: this folder is not a complete dino-vos report." }));
    return;
  }
  window.addEventListener("hashchange", route);
  route();
})();
