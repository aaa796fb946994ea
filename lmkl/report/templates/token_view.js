(function () {
  "use strict";
  // lmkl token view: tooltips, metric/candidate switch and document list sorting.
  // Reads the JSON data block; writes only textContent and class names (never HTML).
  var root = document.getElementById("token-view");
  var block = document.getElementById("tv-data");
  if (!root || !block) { return; }
  var D = JSON.parse(block.textContent);
  var spans = root.querySelectorAll(".tv-text span.t");
  var N = D.tok.length;
  if (spans.length !== N) { return; }
  var SHADES = 8;
  var metricSel = document.getElementById("tv-metric");
  var candSel = document.getElementById("tv-cand");
  var tip = document.getElementById("tv-tip");
  var cache = {};
  var state = { metric: "kl", cand: 0 };
  var current = -1;

  function column(k, m) {
    var key = k + ":" + m;
    if (cache[key]) { return cache[key]; }
    var out = new Float64Array(N), c = D.c[k], i;
    if (m === "delta_p") {
      for (i = 0; i < N; i++) {
        var nr = c.nll_reference[i], nc = c.nll_candidate[i];
        out[i] = (nr === null || nc === null) ? NaN : Math.abs(Math.exp(-nc) - Math.exp(-nr));
      }
    } else {
      var src = c[m];
      for (i = 0; i < N; i++) { out[i] = src[i] === null ? NaN : src[i]; }
    }
    cache[key] = out;
    return out;
  }

  function spread(m) {
    var key = "diff:" + m;
    if (cache[key]) { return cache[key]; }
    var out = new Float64Array(N), cols = [], k, i;
    for (k = 0; k < D.c.length; k++) { cols.push(column(k, m)); }
    for (i = 0; i < N; i++) {
      var lo = Infinity, hi = -Infinity, seen = 0;
      for (k = 0; k < cols.length; k++) {
        var v = cols[k][i];
        if (v === v) { seen++; if (v < lo) { lo = v; } if (v > hi) { hi = v; } }
      }
      out[i] = seen ? (hi === lo ? 0 : hi - lo) : NaN;
    }
    cache[key] = out;
    return out;
  }

  function shown() {
    return state.cand === "diff" ? spread(state.metric) : column(state.cand, state.metric);
  }

  function edges() {
    return state.cand === "diff" ? D.diff_edges[state.metric]
      : D.edges[D.candidates[state.cand]][state.metric];
  }

  function shadeOf(v, e) {
    if (v !== v) { return -1; }
    if (v === Infinity) { return SHADES; }
    var s = 0;
    while (s < SHADES && v >= e[s]) { s++; }
    return s;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || v !== v) { return "–"; }
    if (v === Infinity) { return "inf"; }
    if (v === 0) { return "0"; }
    return Number(v).toPrecision(digits || 4);
  }

  function pct(v) {
    if (v === null || v !== v) { return "–"; }
    return (100 * v).toPrecision(4) + "%";
  }

  function visible(text) {
    var out = text.replace(/\r/g, "␍").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "·");
    return out === "" ? "∅" : out;
  }

  function paint() {
    var vals = shown(), e = edges(), i;
    for (i = 0; i < N; i++) {
      var s = shadeOf(vals[i], e);
      spans[i].className = s < 0 ? "t nf" : "t s" + s;
    }
    var labels = root.querySelectorAll("#tv-legend .lg");
    if (labels.length === SHADES + 1) {
      labels[0].textContent = "< " + fmt(e[0], 2);
      for (i = 0; i < SHADES; i++) {
        labels[i + 1].textContent = fmt(e[i], 2) + "–" + fmt(e[i + 1], 2);
      }
    }
    var what = D.labels[state.metric];
    var title = document.getElementById("tv-legend-title");
    if (title) {
      title.textContent = (state.cand === "diff" ? "largest difference between candidates in " + what
        : what + " of " + D.candidates[state.cand]) + " (log scale)";
    }
    sortList(vals);
    if (current >= 0 && !tip.hidden) { show(current, spans[current]); }
  }

  function sortList(vals) {
    var body = document.querySelector("#tv-list tbody");
    if (!body) { return; }
    var rows = Array.prototype.slice.call(body.querySelectorAll("tr"));
    rows.forEach(function (row) {
      var d = +row.getAttribute("data-doc");
      var a = D.starts[d], b = d + 1 < D.starts.length ? D.starts[d + 1] : N;
      var sum = 0, n = 0, idx = [], i;
      for (i = a; i < b; i++) {
        var v = vals[i];
        if (v === v) { sum += Math.min(v, 1e30); n++; idx.push(i); }
      }
      idx.sort(function (x, y) { return vals[y] - vals[x] || x - y; });
      row._mean = n ? sum / n : -Infinity;
      row.querySelector(".mean").textContent = n ? fmt(sum / n, 3) : "–";
      var links = row.querySelectorAll(".worst a");
      for (i = 0; i < links.length; i++) {
        if (i < idx.length) {
          links[i].hidden = false;
          links[i].setAttribute("href", "#tv-t" + idx[i]);
          links[i].setAttribute("data-i", idx[i]);
          links[i].textContent = fmt(vals[idx[i]], 3);
        } else { links[i].hidden = true; }
      }
    });
    rows.sort(function (x, y) { return y._mean - x._mean; });
    rows.forEach(function (row) { body.appendChild(row); });
    var head = document.getElementById("tv-list-metric");
    if (head) { head.textContent = "mean " + D.labels[state.metric]; }
  }

  function unitOf(i) {
    var lo = 0, hi = D.starts.length - 1;
    while (lo < hi) {
      var mid = (lo + hi + 1) >> 1;
      if (D.starts[mid] <= i) { lo = mid; } else { hi = mid - 1; }
    }
    return lo;
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function row(table, name, value, field) {
    var tr = el("tr");
    tr.appendChild(el("th", "", name));
    var td = el("td", "num", value);
    if (field) { td.setAttribute("data-field", field); }
    tr.appendChild(td);
    table.appendChild(tr);
  }

  function topList(title, ids, probs, i, field) {
    var box = el("div", "tv-top");
    box.appendChild(el("h4", "", title));
    var table = el("table");
    table.setAttribute("data-field", field);
    for (var k = 0; k < 5; k++) {
      var p = probs[5 * i + k];
      if (p === null) { continue; }
      var tr = el("tr");
      var code = el("code", "", visible(D.vocab[ids[5 * i + k]]));
      var td = el("td");
      td.appendChild(code);
      tr.appendChild(td);
      tr.appendChild(el("td", "num", pct(p)));
      table.appendChild(tr);
    }
    box.appendChild(table);
    return box;
  }

  function show(i, anchor) {
    if (current >= 0 && current !== i) { spans[current].removeAttribute("aria-describedby"); }
    current = i;
    anchor.setAttribute("aria-describedby", "tv-tip");
    var d = unitOf(i);
    while (tip.firstChild) { tip.removeChild(tip.firstChild); }
    var head = el("div", "tv-tip-head");
    head.appendChild(el("code", "tv-tip-token", visible(D.vocab[D.tok[i]])));
    head.lastChild.setAttribute("data-field", "token");
    head.appendChild(el("span", "sub", " " + D.noun + " " + D.units[d] + ", position " + D.pos[i]));
    tip.appendChild(head);
    var ks = state.cand === "diff" ? D.c.map(function (_, k) { return k; }) : [state.cand];
    var c0 = D.c[ks[0]];
    var nums = el("table", "tv-nums");
    row(nums, "p(next)", pct(c0.nll_reference[i] === null ? NaN : Math.exp(-c0.nll_reference[i])), "p");
    ks.forEach(function (k) {
      var c = D.c[k], suffix = ks.length > 1 ? " · " + D.candidates[k] : "";
      var field = ks.length > 1 ? ":" + k : "";
      row(nums, "q(next)" + suffix, pct(c.nll_candidate[i] === null ? NaN : Math.exp(-c.nll_candidate[i])), "q" + field);
      row(nums, "KL(P‖Q)" + suffix, fmt(c.kl[i]), "kl" + field);
      row(nums, "KL(Q‖P)" + suffix, fmt(c.reverse_kl[i]), "reverse_kl" + field);
      row(nums, "JSD" + suffix, fmt(c.jsd[i]), "jsd" + field);
    });
    tip.appendChild(nums);
    var tops = el("div", "tv-tops");
    tops.appendChild(topList("reference P top-5", D.rt, D.rp, i, "reference_top5"));
    ks.forEach(function (k) {
      var name = ks.length > 1 ? D.candidates[k] + " top-5" : "candidate Q top-5";
      tops.appendChild(topList(name, D.c[k].ct, D.c[k].cp, i, "candidate_top5" + (ks.length > 1 ? ":" + k : "")));
    });
    tip.appendChild(tops);
    tip.hidden = false;
    var r = anchor.getBoundingClientRect(), w = tip.offsetWidth, h = tip.offsetHeight;
    var x = Math.max(8, Math.min(window.innerWidth - w - 8, r.left));
    var y = r.bottom + 6;
    if (y + h > window.innerHeight - 8 && r.top - h - 6 > 8) { y = r.top - h - 6; }
    tip.style.left = (x + window.scrollX) + "px";
    tip.style.top = (y + window.scrollY) + "px";
  }

  function hide() { tip.hidden = true; }

  function focusToken(i) {
    if (i < 0 || i >= N) { return; }
    var span = spans[i];
    // Roving tab stop: one per document, moved to the token last focused there.
    var old = span.parentNode.querySelector("span.t[tabindex='0']");
    span.setAttribute("tabindex", "0");
    if (old && old !== span) { old.setAttribute("tabindex", "-1"); }
    span.focus();
  }

  function indexOf(node) {
    var span = node && node.closest ? node.closest("span.t") : null;
    if (!span) { return -1; }
    return +span.id.slice(4);
  }

  // One tab stop per document (its first scored token); arrows move between tokens.
  D.starts.forEach(function (s, d) {
    var end = d + 1 < D.starts.length ? D.starts[d + 1] : N;
    if (s < end) { spans[s].setAttribute("tabindex", "0"); }
  });
  root.addEventListener("mouseover", function (ev) {
    var i = indexOf(ev.target);
    if (i >= 0) { show(i, spans[i]); }
  });
  root.addEventListener("mouseout", function (ev) {
    if (indexOf(ev.target) >= 0 && !(ev.relatedTarget && tip.contains(ev.relatedTarget))) {
      if (document.activeElement !== ev.target) { hide(); }
    }
  });
  root.addEventListener("focusin", function (ev) {
    var i = indexOf(ev.target);
    if (i >= 0) { show(i, spans[i]); }
  });
  root.addEventListener("click", function (ev) {
    var link = ev.target.closest ? ev.target.closest("a[data-i]") : null;
    if (link) {
      ev.preventDefault();
      var j = +link.getAttribute("data-i");
      spans[j].scrollIntoView({ block: "center" });
      focusToken(j);
      return;
    }
    var i = indexOf(ev.target);
    if (i >= 0) { focusToken(i); show(i, spans[i]); }
  });
  root.addEventListener("keydown", function (ev) {
    var i = indexOf(ev.target);
    if (ev.key === "Escape") { hide(); return; }
    if (i < 0) { return; }
    var d = unitOf(i), first = D.starts[d];
    var last = (d + 1 < D.starts.length ? D.starts[d + 1] : N) - 1;
    var to = -1;
    if (ev.key === "ArrowRight" || ev.key === "ArrowDown") { to = Math.min(i + 1, N - 1); }
    else if (ev.key === "ArrowLeft" || ev.key === "ArrowUp") { to = Math.max(i - 1, 0); }
    else if (ev.key === "Home") { to = first; }
    else if (ev.key === "End") { to = last; }
    if (to >= 0) { ev.preventDefault(); focusToken(to); }
  });
  metricSel.addEventListener("change", function () { state.metric = metricSel.value; paint(); });
  candSel.addEventListener("change", function () {
    state.cand = candSel.value === "diff" ? "diff" : +candSel.value;
    paint();
  });
  root.classList.add("tv-js");
  paint();
  document.documentElement.setAttribute("data-token-view", "ready");
})();
