// The web console: plain JavaScript, no build step, nothing fetched from
// anywhere but this server. Views are chosen by the URL fragment:
//   #/store  #/stream/<name>  #/log  #/trace/<correlation id>
//   #/followers  #/orders  #/order/<id>
// Data comes from the JSON endpoints under /admin/ (admin tokens only) and
// from the order service's own endpoints (/orders...). Every list is paged:
// no view ever asks for a whole log.
"use strict";
(function () {
  var TOKEN_KEY = "es-console-token";
  var view = document.getElementById("view");
  var timers = [];          // intervals of the current view, cleared on leaving it

  // ------------------------------------------------------------ helpers

  // h("tag", { attr: value, onclick: fn }, child, ...): text is never parsed as HTML
  function h(tag, attrs) {
    var el = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      var v = attrs[k];
      if (v === null || v === undefined || v === false) return;
      if (k.slice(0, 2) === "on") el.addEventListener(k.slice(2), v);
      else if (k === "indent") el.style.marginLeft = v;   // CSSOM: allowed by the CSP, a style attribute is not
      else if (k === "text") el.textContent = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    });
    for (var i = 2; i < arguments.length; i++) add(el, arguments[i]);
    return el;
  }
  function add(el, c) {
    if (c === null || c === undefined || c === false) return;
    if (Array.isArray(c)) { c.forEach(function (x) { add(el, x); }); return; }
    el.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
  }
  function show(el) { view.replaceChildren(el); }
  function message(text, isError) {
    var m = document.getElementById("message");
    m.textContent = text || "";
    m.className = isError ? "error" : "";
  }
  function enc(s) { return encodeURIComponent(s); }
  function pretty(v) { return JSON.stringify(v, null, 2); }
  function short(id) { return id ? String(id).slice(0, 13) + "…" : ""; }
  // a table; on narrow screens each row stacks as label: value lines
  // (the labels come from data-label, set here from the headers)
  function table(headers, rows) {
    rows.forEach(function (tr) {
      Array.prototype.forEach.call(tr.children, function (td, i) {
        if (headers[i]) td.setAttribute("data-label", headers[i]);
      });
    });
    return h("div", { class: "scroll" }, h("table", { class: "stack" },
      h("thead", null, h("tr", null, headers.map(function (x) { return h("th", { scope: "col" }, x); }))),
      h("tbody", null, rows)));
  }
  function every(ms, fn) { timers.push(setInterval(fn, ms)); }

  // ------------------------------------------------------------ the API

  function token() { return sessionStorage.getItem(TOKEN_KEY); }

  // fetch JSON with the admin token; rejects with { status, kind, message }
  function api(path, method) {
    return fetch(path, {
      method: method || "GET",
      headers: { "Authorization": "Bearer " + token(), "Accept": "application/json" },
      cache: "no-store",
    }).then(function (r) {
      return r.text().then(function (text) {
        var body = null;
        try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
        if (r.ok) return body;
        var err = (body && body.error) || { kind: "http", message: "HTTP " + r.status };
        err.status = r.status;
        if (r.status === 401) { logout("Your token was refused: log in again."); }
        throw err;
      });
    });
  }
  function failed(err) { message((err.kind || "error") + ": " + (err.message || err), true); }

  // ------------------------------------------------------------ login

  function loggedIn(yes) {
    document.getElementById("login").hidden = yes;
    document.getElementById("nav").hidden = !yes;
    view.hidden = !yes;
  }
  function logout(why) {
    sessionStorage.removeItem(TOKEN_KEY);
    clearTimers();
    view.replaceChildren();
    loggedIn(false);
    message(why || "", !!why);
    document.getElementById("token").focus();
  }
  document.getElementById("logout").addEventListener("click", function () { logout(); });
  document.getElementById("login-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var t = document.getElementById("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, t);
    // a customer's token is refused here (403) and not kept
    api("/admin/overview").then(function () {
      document.getElementById("token").value = "";
      message("");
      loggedIn(true);
      route();
    }, function (err) {
      sessionStorage.removeItem(TOKEN_KEY);
      loggedIn(false);
      message(err.status === 403 ? "This token is not an admin token: the console needs one."
        : (err.kind || "error") + ": " + err.message, true);
    });
  });

  // ------------------------------------------------------------ Store

  function streamLink(name) { return h("a", { href: "#/stream/" + enc(name) }, name); }
  function traceLink(id) { return id ? h("a", { href: "#/trace/" + enc(id), title: id }, short(id)) : ""; }

  function storeView(params) {
    var category = params.category || "", search = params.search || "";
    var root = h("section", { "aria-labelledby": "store-title" }, h("h2", { id: "store-title" }, "Store"));
    var cards = h("div", { class: "cards" });
    var cats = h("div");
    var list = h("div");
    var form = h("form", { class: "inline", role: "search" },
      h("div", null, h("label", { for: "stream-search" }, "Search streams by name"),
        h("input", { id: "stream-search", type: "search", value: search, placeholder: "Order-01a2…" })),
      h("button", { type: "submit" }, "Search"));
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var q = document.getElementById("stream-search").value;
      location.hash = "#/store?" + (category ? "category=" + enc(category) + "&" : "") + "search=" + enc(q);
    });
    add(root, [cards, h("h3", null, "Categories"), cats, h("h3", null, "Streams"), form, list]);
    show(root);
    api("/admin/overview").then(function (s) {
      add(cards, [["events", s.events], ["streams", s.streams], ["last position", s.last_position || 0],
        ["size on disk", Math.round((s.size_bytes || 0) / 1024) + " KiB"]].map(function (c) {
        return h("div", { class: "card" }, h("b", null, c[1]), h("span", null, c[0]));
      }));
      cats.replaceChildren(table(["category", "events", "streams"],
        (s.categories || []).map(function (c) {
          return h("tr", null,
            h("td", null, h("a", { href: "#/store?category=" + enc(c.category) }, c.category)),
            h("td", { class: "num" }, c.events), h("td", { class: "num" }, c.streams));
        })));
    }, failed);
    var pages = [""];
    function page(after) {
      var q = "/admin/streams?limit=50" + (category ? "&category=" + enc(category) : "")
        + (search ? "&search=" + enc(search) : "") + (after ? "&after=" + enc(after) : "");
      api(q).then(function (r) {
        var rows = r.streams.map(function (s) {
          return h("tr", null, h("td", { class: "mono" }, streamLink(s.stream)),
            h("td", { class: "num" }, s.version), h("td", null, s.last_type || ""),
            h("td", { class: "mono" }, s.last_recorded_at || ""));
        });
        var prev = h("button", { type: "button", disabled: pages.length < 2, onclick: function () {
          pages.pop(); page(pages[pages.length - 1]);
        } }, "Previous page");
        var next = h("button", { type: "button", disabled: !r.next, onclick: function () {
          pages.push(r.next); page(r.next);
        } }, "Next page");
        list.replaceChildren(
          h("p", { class: "hint" }, (category ? "category " + category + " · " : "")
            + (search ? "matching “" + search + "” · " : "") + r.streams.length + " shown"),
          table(["stream", "version", "last event", "last recorded"], rows),
          h("div", { class: "pager" }, prev, next));
      }, failed);
    }
    page("");
  }

  function eventRows(events, withStream) {
    return events.map(function (e) {
      var m = e.metadata || {};
      return h("tr", { "data-position": e.position },
        h("td", { class: "num" }, e.position),
        withStream ? h("td", { class: "mono" }, streamLink(e.stream)) : null,
        h("td", { class: "num" }, e.version),
        h("td", null, h("details", null, h("summary", null, e.type),
          h("div", null, h("label", null, "data"), h("pre", null, pretty(e.data))),
          h("div", null, h("label", null, "metadata"), h("pre", null, pretty(e.metadata))),
          h("div", { class: "hint" }, "id " + e.id))),
        h("td", { class: "mono" }, e.recorded_at),
        h("td", null, traceLink(m.correlation_id)));
    });
  }

  function streamView(name, params) {
    var from = Math.max(1, parseInt(params.from || "1", 10) || 1);
    var root = h("section", null, h("h2", null, "Stream ", h("span", { class: "mono", id: "stream-name" }, name)));
    show(root);
    api("/admin/streams/" + enc(name) + "?limit=50&from=" + from).then(function (r) {
      var base = "#/stream/" + enc(name) + "?from=";
      add(root, [
        h("p", null, "version " + r.version + " · events " + from + "–" + (from + r.events.length - 1)),
        table(["position", "version", "type (open for data)", "recorded_at", "correlation"],
          eventRows(r.events, false)),
        h("div", { class: "pager" },
          from > 1 ? h("a", { href: base + Math.max(1, from - 50) }, "← earlier") : null,
          from + 50 <= r.version ? h("a", { href: base + (from + 50) }, "later →") : null)]);
    }, failed);
  }

  // ------------------------------------------------------------ Live log

  function logView() {
    var MAX_ROWS = 200, maxRows = MAX_ROWS, before = null;
    var HEADERS = ["position", "stream", "version", "type", "recorded_at", "correlation"];
    function label(tr) {
      Array.prototype.forEach.call(tr.children, function (td, i) { td.setAttribute("data-label", HEADERS[i]); });
    }
    var body = h("tbody", { id: "log-rows" });
    var state = h("span", { class: "hint", id: "log-state" }, "loading…");
    var paused = false;
    var pause = h("button", { type: "button", onclick: function () {
      paused = !paused;
      pause.textContent = paused ? "Resume" : "Pause";
      state.textContent = paused ? "paused" : "live";
    } }, "Pause");
    // older events: keyset pages back from the oldest one shown
    var older = h("button", { type: "button", id: "log-older", disabled: true, onclick: function () {
      older.disabled = true;
      api("/admin/log?limit=50&before=" + enc(before)).then(function (r) {
        maxRows += r.events.length;
        eventRows(r.events.slice().reverse(), true).forEach(function (tr) { label(tr); body.appendChild(tr); });
        before = r.before;
        older.disabled = !before;
      }, failed);
    } }, "Older events");
    show(h("section", null, h("h2", null, "Global log (live)"),
      h("div", { class: "pager" }, pause, state,
        h("span", { class: "hint" }, "newest first; " + MAX_ROWS + " new events at most are kept on the page")),
      h("div", { class: "scroll" }, h("table", { class: "stack" },
        h("thead", null, h("tr", null, HEADERS.map(function (x) { return h("th", { scope: "col" }, x); }))), body)),
      h("div", { class: "pager" }, older)));
    var checkpoint = null, busy = false;
    function put(events, fresh) {
      eventRows(events, true).forEach(function (tr) {
        label(tr);
        if (fresh) tr.className = "fresh";
        body.insertBefore(tr, body.firstChild);
      });
      while (body.children.length > maxRows) body.removeChild(body.lastChild);
    }
    api("/admin/log?limit=50").then(function (r) {
      put(r.events, false);
      checkpoint = r.checkpoint;
      before = r.before;
      older.disabled = !before;
      state.textContent = "live";
      // new events: read_all after the last checkpoint, every 300 ms
      every(300, function () {
        if (busy || paused) return;
        busy = true;
        api("/admin/log?limit=200" + (checkpoint ? "&after=" + enc(checkpoint) : "")).then(function (n) {
          busy = false;
          if (n.events.length) { put(n.events, true); checkpoint = n.checkpoint; }
        }, function (err) { busy = false; failed(err); });
      });
    }, failed);
  }

  // ------------------------------------------------------------ Trace

  function traceView(id) {
    var root = h("section", null, h("h2", null, "Correlation ", h("span", { class: "mono" }, id)));
    show(root);
    api("/admin/trace/" + enc(id)).then(function (r) {
      var byId = {}, depth = {};
      r.events.forEach(function (e) { byId[e.id] = e; });
      function depthOf(e) {
        if (depth[e.id] !== undefined) return depth[e.id];
        depth[e.id] = 0;
        var c = e.metadata && e.metadata.causation_id;
        if (c && byId[c] && c !== e.id) depth[e.id] = depthOf(byId[c]) + 1;
        return depth[e.id];
      }
      add(root, h("p", null, r.events.length + " events in this chain, in the global order"));
      add(root, h("ol", { class: "trace", id: "trace-list" }, r.events.map(function (e) {
        var m = e.metadata || {}, cause = m.causation_id && byId[m.causation_id];
        return h("li", { indent: Math.min(depthOf(e), 8) * 24 + "px", "data-id": e.id },
          h("div", null, h("b", null, e.type), " · ", streamLink(e.stream), " v" + e.version,
            " · ", h("span", { class: "mono" }, e.recorded_at)),
          cause ? h("div", { class: "arrow" }, "↳ caused by " + cause.type + " (" + cause.stream + " v"
            + cause.version + ")" + (m.workflow ? " via workflow " + m.workflow : ""))
            : h("div", { class: "arrow" }, m.causation_id && m.causation_id !== e.id
              ? "↳ caused by " + short(m.causation_id) + " (outside the store)" : "● start of the chain"),
          h("details", null, h("summary", null, "data and metadata"),
            h("pre", null, pretty(e.data)), h("pre", null, pretty(e.metadata))));
      })));
    }, failed);
  }

  // ------------------------------------------------------------ Followers

  function stateCell(s) { return h("td", null, h("span", { class: "state-" + s }, s)); }

  function followersView() {
    var projections = h("div", { id: "projections" });
    var workflows = h("div", { id: "workflows" });
    var dead = h("div", { id: "dead-letters" });
    var bars = {};   // rebuild bars survive the periodic refresh
    show(h("section", null, h("h2", null, "Followers"),
      h("h3", null, "Projections and read models"), projections,
      h("h3", null, "Workflows"), workflows,
      h("h3", null, "Dead letters"), dead));

    function act(path, label) {
      message(label + "…");
      return api(path, "POST").then(function (r) { message(label + ": done"); refresh(); return r; },
        function (err) { failed(err); refresh(); });
    }
    function bar(name) {
      if (!bars[name]) {
        var fill = h("div");
        var outer = h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
          "aria-valuenow": 0, "aria-label": "rebuild of " + name, id: "bar-" + name }, fill);
        bars[name] = { el: h("div", { hidden: true }, outer, h("div", { class: "bar-label", id: "bar-label-" + name })),
          outer: outer, fill: fill };
      }
      return bars[name];
    }
    function setBar(name, pct, text) {
      var b = bar(name);
      b.el.hidden = false;
      b.fill.style.width = pct + "%";
      b.outer.setAttribute("aria-valuenow", pct);
      b.el.lastChild.textContent = text;
    }
    // a running rebuild's bar, from GET /admin/progress/{name}
    var mine = {};   // rebuilds this page started (their request says when they end)
    function progress(name) {
      return api("/admin/progress/" + enc(name)).then(function (p) {
        var shown = bars[name] && !bars[name].el.hidden;
        if (p.state === "running" && p.total > 0) {
          setBar(name, Math.floor(100 * p.done / p.total), p.done + " / " + p.total + " events, "
            + Math.round(p.rate || 0) + " events/s, ETA " + Math.round(p.eta || 0) + " s");
        } else if (shown && !mine[name] && p.state === "done") {
          setBar(name, 100, "rebuilt from " + p.done + " events");
        } else if (shown && !mine[name] && p.state === "failed") {
          setBar(name, 0, "failed: " + p.error);
        }
        return p;
      }, function () {});
    }
    function rebuild(name) {
      mine[name] = true;
      setBar(name, 0, "starting…");
      var poll = setInterval(function () { progress(name); }, 200);
      timers.push(poll);
      message("rebuilding " + name + "…");
      api("/admin/projections/" + enc(name) + "/rebuild", "POST").then(function (r) {
        clearInterval(poll);
        mine[name] = false;
        setBar(name, 100, "rebuilt from " + r.events + " events");
        message("rebuilt " + name + " from " + r.events + " events");
        refresh();
      }, function (err) { clearInterval(poll); mine[name] = false; setBar(name, 0, "failed"); failed(err); });
    }
    function button(text, fn, cls) { return h("button", { type: "button", class: cls, onclick: fn }, text); }

    function refresh() {
      api("/admin/projections").then(function (rows) {
        projections.replaceChildren(table(["name", "state", "checkpoint", "lag (events)", "lag (s)", "handled",
          "last error", "actions", "rebuild"], rows.map(function (p) {
          var base = "/admin/projections/" + enc(p.name) + "/";
          return h("tr", { "data-name": p.name }, h("td", null, p.name), stateCell(p.state || p.status),
            h("td", { class: "mono" }, p.checkpoint || "–"),
            // while events wait: the transaction elsewhere that holds them back
            h("td", { class: "num", title: p.held_by ? "waiting for pid " + p.held_by.pid + " ("
              + p.held_by.state + ", " + Math.round(p.held_by.seconds) + " s): " + p.held_by.query : "" },
              p.held_by ? p.lag_events + " (held by pid " + p.held_by.pid + ")" : p.lag_events),
            h("td", { class: "num" }, (p.lag_seconds || 0).toFixed(1)), h("td", { class: "num" }, p.handled),
            h("td", { class: "mono" }, p.error || ""),
            h("td", null, h("div", { class: "actions" },
              button("Pause", function () { act(base + "pause", "pause " + p.name); }),
              button("Resume", function () { act(base + "resume", "resume " + p.name); }),
              button("Retry", function () { act(base + "retry", "retry " + p.name); }),
              button("Rebuild", function () {
                // the README's limit: a read model also updated inline can
                // lose appends made during the final swap
                if (confirm("Rebuild " + p.name + " from the whole log? If commands also update it inline, "
                  + "pause writers first: appends made during the final swap can be lost.")) rebuild(p.name);
              }, "primary"))),
            h("td", null, bar(p.name).el));
        })));
        rows.forEach(function (p) { if (!mine[p.name]) progress(p.name); });
      }, failed);
      api("/admin/workflows").then(function (rows) {
        workflows.replaceChildren(table(["name", "state", "checkpoint", "lag (events)", "lag (s)", "handled",
          "dead letters", "timers", "actions"], rows.map(function (w) {
          var base = "/admin/workflows/" + enc(w.name) + "/";
          return h("tr", null, h("td", null, w.name), stateCell(w.state),
            h("td", { class: "mono" }, w.checkpoint || "–"), h("td", { class: "num" }, w.lag_events),
            h("td", { class: "num" }, w.lag_seconds === undefined ? "" : (w.lag_seconds || 0).toFixed(1)),
            h("td", { class: "num" }, w.handled), h("td", { class: "num" }, w.dead_letters),
            h("td", { class: "num" }, w.timers),
            h("td", null, h("div", { class: "actions" },
              button("Pause", function () { act(base + "pause", "pause " + w.name); }),
              button("Resume", function () { act(base + "resume", "resume " + w.name); }))));
        })));
      }, failed);
      api("/admin/dead-letters").then(function (rows) {
        if (!rows.length) { dead.replaceChildren(h("p", { class: "hint" }, "No dead letters.")); return; }
        dead.replaceChildren(table(["workflow", "event", "stream", "error", "attempts", "failed at", "actions"],
          rows.map(function (d) {
            var id = d.workflow + ":" + d.event_id, base = "/admin/dead-letters/" + enc(id) + "/";
            return h("tr", { "data-event-id": d.event_id }, h("td", null, d.workflow),
              h("td", null, d.type || "", h("div", { class: "hint mono" }, d.event_id)),
              h("td", { class: "mono" }, d.stream ? streamLink(d.stream) : ""),
              h("td", { class: "mono" }, d.error || ""), h("td", { class: "num" }, d.attempts),
              h("td", { class: "mono" }, d.failed_at || ""),
              h("td", null, h("div", { class: "actions" },
                button("Retry", function () { act(base + "retry", "retry dead letter " + d.event_id); }),
                button("Discard", function () {
                  if (confirm("Discard the dead letter of " + d.event_id + "?")) {
                    act(base + "discard", "discard dead letter " + d.event_id);
                  }
                }, "danger"))));
          })));
      }, failed);
    }
    refresh();
    every(3000, refresh);
  }

  // ------------------------------------------------------------ Orders

  function money(cents) { return (Number(cents || 0) / 100).toFixed(2); }

  function ordersView(params) {
    var customer = params.customer || "";
    var list = h("div", { id: "orders-list" });
    var form = h("form", { class: "inline" },
      h("div", null, h("label", { for: "customer" }, "Customer id"),
        h("input", { id: "customer", type: "text", value: customer, required: true })),
      h("button", { type: "submit", class: "primary" }, "Show orders"));
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      location.hash = "#/orders?customer=" + enc(document.getElementById("customer").value.trim());
    });
    show(h("section", null, h("h2", null, "Orders"),
      h("p", { class: "hint" }, "From the read model rm_orders (GET /orders?customer_id=)."), form, list));
    if (!customer) return;
    var pages = [""];
    function page(after) {
      api("/orders?limit=25&customer_id=" + enc(customer) + (after ? "&after=" + enc(after) : ""))
        .then(function (r) {
          list.replaceChildren(table(["order", "status", "items", "total", "created"],
            r.orders.map(function (o) {
              return h("tr", null, h("td", { class: "mono" }, h("a", { href: "#/order/" + enc(o.id) }, o.id)),
                h("td", null, o.status), h("td", { class: "num" }, (o.items || []).length),
                h("td", { class: "num" }, money(o.total)), h("td", { class: "mono" }, o.created_at || ""));
            })),
            h("div", { class: "pager" },
              h("button", { type: "button", disabled: pages.length < 2, onclick: function () {
                pages.pop(); page(pages[pages.length - 1]);
              } }, "Previous page"),
              h("button", { type: "button", disabled: !r.next, onclick: function () {
                pages.push(r.next); page(r.next);
              } }, "Next page")));
        }, failed);
    }
    page("");
  }

  function orderState(o) {
    return h("div", { id: "order-state" },
      h("div", { class: "cards" },
        h("div", { class: "card" }, h("b", { id: "order-version" }, o.version), h("span", null, "version")),
        h("div", { class: "card" }, h("b", { id: "order-status" }, o.status), h("span", null, "status")),
        h("div", { class: "card" }, h("b", { id: "order-total" }, money(o.total)), h("span", null, "total"))),
      table(["product", "quantity", "unit price"], (o.items || []).map(function (i) {
        return h("tr", null, h("td", null, i.product_id), h("td", { class: "num" }, i.quantity),
          h("td", { class: "num" }, money(i.unit_price)));
      })));
  }

  function orderView(id) {
    var root = h("section", null, h("h2", null, "Order ", h("span", { class: "mono" }, id)));
    show(root);
    api("/orders/" + enc(id) + "/history").then(function (hist) {
      var events = hist.events, max = hist.version;
      var stateBox = h("div");
      var label = h("output", { id: "travel-label", for: "travel" });
      var slider = h("input", { id: "travel", type: "range", min: 1, max: max, value: max, step: 1,
        "aria-label": "order version" });
      var instant = h("input", { id: "travel-at", type: "text", placeholder: "2026-01-15T10:00:00Z" });
      var timeline = h("ol", { class: "timeline", id: "timeline" }, events.map(function (e) {
        return h("li", { "data-version": e.version },
          h("b", null, "v" + e.version + " " + e.type), " · ", h("span", { class: "mono" }, e.recorded_at),
          e.user ? " · by " + e.user : "",
          h("details", null, h("summary", null, "data"), h("pre", null, pretty(e.data)),
            h("pre", null, pretty(e.metadata))));
      }));
      var seq = 0;
      function load(q, what) {
        var mine = ++seq;
        api("/orders/" + enc(id) + "?" + q).then(function (o) {
          if (mine !== seq) return;   // a later move of the slider won
          stateBox.replaceChildren(orderState(o));
          label.textContent = what + " → version " + o.version;
          Array.prototype.forEach.call(timeline.children, function (li) {
            li.className = Number(li.getAttribute("data-version")) > o.version ? "future" : "";
          });
          if (String(slider.value) !== String(o.version)) slider.value = o.version;
        }, failed);
      }
      function atVersion() {
        var v = Number(slider.value), e = events[v - 1];
        load("version=" + v, "as of version " + v + (e ? " (" + e.recorded_at + ")" : ""));
      }
      slider.addEventListener("input", atVersion);
      var form = h("form", { class: "inline" },
        h("div", null, h("label", { for: "travel-at" }, "…or as it was just before an instant (ISO-8601)"), instant),
        h("button", { type: "submit" }, "Go"));
      form.addEventListener("submit", function (ev) {
        ev.preventDefault();
        load("at=" + enc(instant.value.trim()), "just before " + instant.value.trim());
      });
      add(root, [
        h("div", { class: "travel" }, h("label", { for: "travel" }, "Time travel: drag or use the arrow keys"),
          slider, h("div", null, label), form),
        h("div", { class: "split" }, h("div", null, h("h3", null, "State"), stateBox),
          h("div", null, h("h3", null, "Timeline"), timeline))]);
      atVersion();
    }, failed);
  }

  // ------------------------------------------------------------ routing

  function clearTimers() { timers.forEach(clearInterval); timers = []; }

  function route() {
    if (!token()) { logout(); return; }
    loggedIn(true);
    clearTimers();
    message("");
    var hash = location.hash.replace(/^#\/?/, "") || "store";
    var q = hash.indexOf("?"), path = q < 0 ? hash : hash.slice(0, q), params = {};
    (q < 0 ? "" : hash.slice(q + 1)).split("&").forEach(function (p) {
      if (!p) return;
      var kv = p.split("=");
      params[decodeURIComponent(kv[0])] = decodeURIComponent(kv.slice(1).join("="));
    });
    var parts = path.split("/"), name = parts[0], arg = parts.slice(1).join("/");
    arg = arg ? decodeURIComponent(arg) : "";
    var current = { stream: "store", trace: "log", order: "orders" }[name] || name;
    Array.prototype.forEach.call(document.querySelectorAll("nav a"), function (a) {
      if (a.getAttribute("data-view") === current) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    });
    if (name === "stream" && arg) streamView(arg, params);
    else if (name === "log") logView();
    else if (name === "trace" && arg) traceView(arg);
    else if (name === "followers") followersView();
    else if (name === "orders") ordersView(params);
    else if (name === "order" && arg) orderView(arg);
    else storeView(params);
    view.focus({ preventScroll: true });
  }

  window.addEventListener("hashchange", route);
  route();
})();
