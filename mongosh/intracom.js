// intracom's admin kit for mongosh: read the bus, find pending work and expired
// leases, follow requests, dead letters and subscriptions, and publish a message by
// hand in the shape the collection's validator accepts.
//
// Load it:
//   mongosh "mongodb://localhost:27017/?directConnection=true" --file mongosh/intracom.js --shell
//   (or, in a running mongosh:  load("mongosh/intracom.js"))
// then:
//   ic = intracom()                      // database `intracom`, default collection names
//   ic = intracom("shop", { messages: "bus" })   // another database or collection names
//   ic.help()
//
// Every helper prints one line per row and returns nothing; `ic.docs.<helper>(...)`
// returns the documents instead (for scripts). Times that decide whether a lease has
// ended are the server's (`hello().localTime`), as intracom's workers judge them.

(function (global) {
  "use strict";

  const MAX_NAME_LEN = 255;
  const TYPES = ["broadcast", "fire_and_forget", "async", "sync", "response"];

  // ---- small helpers -------------------------------------------------------------

  // A ULID (time-sortable unique id), the kind of id intracom generates.
  function newId() {
    const alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let time = Date.now();
    let out = "";
    for (let i = 0; i < 10; i++) {
      out = alphabet[time % 32] + out;
      time = Math.floor(time / 32);
    }
    const random = require("crypto").randomBytes(16);
    for (let i = 0; i < 16; i++) out += alphabet[random[i] % 32];
    return out;
  }

  // The checks intracom's consumers apply to names (ids, services, actions).
  function checkName(field, value) {
    if (typeof value !== "string" || value.length === 0) {
      throw new Error(`\`${field}\` must be a non-empty string`);
    }
    if (Buffer.byteLength(value, "utf8") > MAX_NAME_LEN) {
      throw new Error(`\`${field}\` is longer than ${MAX_NAME_LEN} bytes`);
    }
    if (/[\s\p{Cc}]/u.test(value)) {
      throw new Error(`\`${field}\` contains whitespace or control characters: ${JSON.stringify(value)}`);
    }
  }

  function tsParts(ts) {
    if (!ts) return null;
    const t = ts.t !== undefined ? ts.t : ts.getHighBits();
    const i = ts.i !== undefined ? ts.i : ts.getLowBits();
    return { t: Number(t), i: Number(i) };
  }

  function showTs(ts) {
    const p = tsParts(ts);
    return p ? `${p.t}:${p.i}` : "-";
  }

  function showDate(d) {
    return d instanceof Date ? d.toISOString() : "-";
  }

  function compact(value) {
    try {
      return EJSON.stringify(value, { relaxed: true });
    } catch (e) {
      return String(value);
    }
  }

  // A number from an int32, int64 (Long) or double.
  function num(x) {
    if (typeof x === "number") return x;
    if (x && typeof x.toNumber === "function") return x.toNumber();
    return Number(x);
  }

  function leaseEnd(lease) {
    if (!lease || !(lease.at instanceof Date)) return null;
    return new Date(lease.at.getTime() + num(lease.ms));
  }

  function line(m) {
    const dest = m.serviceNameDest === null || m.serviceNameDest === undefined
      ? "*"
      : m.serviceNameDest + (m.instanceDest ? "/" + m.instanceDest : "");
    const parts = [
      showTs(m.ts),
      showDate(m.at),
      m._id,
      m.type,
      `${m.serviceNameSource}/${m.instanceSource} -> ${dest}`,
      m.action,
    ];
    if (m.delivery === "one") parts.push("one");
    if (m.state) parts.push("state=" + m.state);
    if (m.priority !== undefined && num(m.priority) !== 0) parts.push("priority=" + num(m.priority));
    if (m.queryId) parts.push("queryId=" + m.queryId);
    if (m.attempts) parts.push("attempts=" + m.attempts);
    if (m.lease) parts.push(`lease=${m.lease.owner}@${showDate(m.lease.at)}+${m.lease.ms}ms`);
    parts.push("query=" + compact(m.query));
    if (m.result !== undefined) parts.push("result=" + compact(m.result));
    if (m.response !== undefined) parts.push("response=" + compact(m.response));
    if (m.lastError) parts.push("lastError=" + JSON.stringify(m.lastError));
    if (m.trace && m.trace.traceparent) parts.push("trace=" + m.trace.traceparent);
    return parts.join("  ");
  }

  // ---- the kit -------------------------------------------------------------------

  function intracom(database, collections) {
    const dbName = database || "intracom";
    const names = Object.assign(
      { messages: "messages", config: "config", checkpoints: "checkpoints", processed: "processed", dead: "dead" },
      collections || {}
    );
    const d = db.getSiblingDB(dbName);
    const messages = d.getCollection(names.messages);
    const catalogColl = d.getCollection(names.config);
    const checkpointsColl = d.getCollection(names.checkpoints);
    const deadColl = d.getCollection(names.dead);
    const processedColl = d.getCollection(names.processed);

    // The server's clock now.
    function serverNow() {
      const hello = d.runCommand({ hello: 1 });
      return hello.localTime instanceof Date ? hello.localTime : new Date();
    }

    // Newest first from the server, returned in the bus's order (ts, _id).
    function newest(filter, n) {
      return messages.find(filter || {}).sort({ ts: -1, _id: -1 }).limit(n || 20).toArray().reverse();
    }

    function messageFilter(spec) {
      const f = {};
      const s = spec || {};
      if (s.action) f.action = s.action;
      if (s.from) f.serviceNameSource = s.from;
      if (s.to) f.serviceNameDest = s.to;
      if (s.service) f.$or = [{ serviceNameSource: s.service }, { serviceNameDest: s.service }];
      if (s.state) f.state = s.state;
      if (s.type) f.type = s.type;
      if (s.queryId) f.queryId = s.queryId;
      if (s.filter) Object.assign(f, s.filter);
      return f;
    }

    const docs = {
      recent: (n, filter) => newest(filter, n),
      find: (spec, n) => newest(messageFilter(spec), n),
      byAction: (action, n) => newest({ action: action }, n),
      byService: (service, n) => newest({ $or: [{ serviceNameSource: service }, { serviceNameDest: service }] }, n),
      byState: (state, n) => newest({ state: state }, n),
      get: (id) => messages.findOne({ _id: id }),
      request: (queryId) => messages.find({ queryId: queryId }).sort({ ts: 1, _id: 1 }).toArray(),

      // Work (`delivery: one`) still pending, per (service, action): waiting (no lease,
      // or one that ended), held by a worker, backing off before a retry; `expired`
      // counts the waiting ones whose lease ended (a worker died or gave up).
      pending: () => {
        const now = serverNow();
        const end = { $dateAdd: { startDate: "$lease.at", unit: "millisecond", amount: "$lease.ms" } };
        const live = { $gt: [end, now] };
        const hasLease = { $eq: [{ $type: "$lease" }, "object"] };
        const backoff = { $eq: ["$lease.owner", "backoff"] };
        return messages.aggregate([
          { $match: { delivery: "one", state: "pending" } },
          { $group: {
            _id: { service: "$serviceNameDest", action: "$action" },
            total: { $sum: 1 },
            held: { $sum: { $cond: [{ $and: [hasLease, live, { $not: [backoff] }] }, 1, 0] } },
            backoff: { $sum: { $cond: [{ $and: [hasLease, live, backoff] }, 1, 0] } },
            expired: { $sum: { $cond: [{ $and: [hasLease, { $not: [live] }, { $not: [backoff] }] }, 1, 0] } },
            oldest: { $min: "$at" },
          } },
          { $sort: { "_id.service": 1, "_id.action": 1 } },
        ]).toArray().map((r) => ({
          service: r._id.service,
          action: r._id.action,
          waiting: r.total - r.held - r.backoff,
          held: r.held,
          backoff: r.backoff,
          expired: r.expired,
          oldest: r.oldest,
          serverTime: now,
        }));
      },

      // Pending work whose lease has ended by the server's clock (not back-off).
      expiredLeases: (n) => {
        const now = serverNow();
        return messages.find({ delivery: "one", state: "pending", "lease.owner": { $exists: true, $ne: "backoff" } })
          .sort({ ts: 1, _id: 1 }).toArray()
          .filter((m) => { const e = leaseEnd(m.lease); return e !== null && e <= now; })
          .slice(0, n || 100)
          .map((m) => Object.assign(m, { leaseEnded: leaseEnd(m.lease), serverTime: now }));
      },

      dead: (n, filter) => deadColl.find(filter || {}).sort({ at: -1, _id: -1 }).limit(n || 20).toArray().reverse(),

      checkpoints: () => checkpointsColl.find({}).sort({ _id: 1 }).toArray(),

      // Each named subscription's lag: the messages after its checkpoint in the bus's
      // order (ts, _id), whatever its filter, and the seconds between its position
      // and the newest message's stamp.
      lag: () => {
        const top = messages.find({}).sort({ ts: -1, _id: -1 }).limit(1).toArray()[0];
        const rows = [];
        // A for loop, not a callback: mongosh awaits its calls only outside callbacks.
        for (const cp of checkpointsColl.find({}).sort({ _id: 1 }).toArray()) {
          const pos = cp.position || {};
          const id = pos.token && typeof pos.token.id === "string" ? pos.token.id : null;
          const after = id === null
            ? { ts: { $gt: pos.ts } }
            : { $or: [{ ts: { $gt: pos.ts } }, { ts: pos.ts, _id: { $gt: id } }] };
          const behind = pos.ts ? messages.countDocuments(after) : messages.countDocuments({});
          const here = tsParts(pos.ts);
          const tip = top ? tsParts(top.ts) : null;
          rows.push({
            name: cp._id,
            behind: behind,
            seconds: here && tip ? Math.max(0, tip.t - here.t) : 0,
            ts: pos.ts,
            id: id,
            updatedAt: cp.updatedAt,
          });
        }
        return rows;
      },

      catalog: () => catalogColl.find({ type: "service" }).sort({ _id: 1 }).toArray(),

      processed: (filter, n) => processedColl.find(filter || {}).sort({ at: -1 }).limit(n || 20).toArray(),
    };

    // The document a hand publish stores (without `ts` and `at`: the server's).
    function buildMessage(spec) {
      const s = spec || {};
      checkName("action", s.action);
      checkName("from", s.from);
      const instance = s.instance || "mongosh";
      checkName("instance", instance);
      const id = s.id || newId();
      checkName("id", id);
      const work = s.work === true || s.delivery === "one" || s.request === true;
      let type = s.type;
      if (!type) type = s.request ? "sync" : s.to ? "fire_and_forget" : "broadcast";
      if (!TYPES.includes(type)) throw new Error(`\`type\` must be one of ${TYPES.join(", ")}`);
      if (s.to !== undefined && s.to !== null) checkName("to", s.to);
      if (s.instanceDest !== undefined) {
        checkName("instanceDest", s.instanceDest);
        if (!s.to) throw new Error("`instanceDest` needs `to` (the service of that instance)");
      }
      if (work && !s.to) throw new Error("work and requests need `to` (the service whose worker takes them)");
      const query = s.body === undefined ? {} : s.body;
      if (query === null || typeof query !== "object" || Array.isArray(query)) {
        throw new Error("`body` must be a document");
      }
      const m = {
        serviceNameSource: s.from,
        instanceSource: instance,
        serviceNameDest: s.to === undefined ? null : s.to,
      };
      if (s.instanceDest !== undefined) m.instanceDest = s.instanceDest;
      m.type = type;
      m.delivery = work ? "one" : "all";
      m.action = s.action;
      m.query = query;
      if (s.request) m.queryId = s.queryId || id;
      else if (s.queryId) m.queryId = s.queryId;
      if (work) m.state = "pending";
      // Nanoseconds since the epoch as a 64-bit integer: a JavaScript number
      // (`Date.now()`) is stored as a double, which the validator refuses.
      m.query_ts = NumberLong((BigInt(Date.now()) * 1000000n).toString());
      if (s.request || s.queryMs !== undefined) m.query_ms = NumberLong(String(s.queryMs === undefined ? 30000 : s.queryMs));
      m.priority = NumberInt(s.priority || 0);
      // The W3C trace context of the handlers' parent span (the bus checks it on read).
      if (s.traceparent !== undefined) {
        if (typeof s.traceparent !== "string" || s.traceparent.length < 55) {
          throw new Error("`traceparent` must be a W3C traceparent: 00-<trace id>-<span id>-<flags>");
        }
        m.trace = { traceparent: s.traceparent };
        if (s.tracestate !== undefined) m.trace.tracestate = String(s.tracestate);
      }
      return { id: id, body: m };
    }

    // Publishes by hand as intracom does: an upsert that can only insert, stamped by
    // the server. A retry with the same id fails with 11000 ("already published")
    // instead of stamping the stored message again.
    function publishDoc(spec) {
      const s = spec || {};
      const built = buildMessage(s);
      if (!s.force) {
        const declared = (svc) => {
          const entry = catalogColl.findOne({ _id: svc, type: "service" });
          return entry && Array.isArray(entry.actions) && entry.actions.includes(s.action);
        };
        // What a subscriber's catalog check accepts: the action declared by the target,
        // or by the sender for a broadcast.
        const owner = built.body.serviceNameDest === null ? s.from : built.body.serviceNameDest;
        if (!catalogColl.findOne({ _id: s.from, type: "service" })) {
          throw new Error(`sender \`${s.from}\` is not in the catalog: subscribers would dead-letter the message (force: true to publish anyway)`);
        }
        if (!declared(owner)) {
          throw new Error(`\`${owner}\` does not declare \`${s.action}\` in the catalog: subscribers would dead-letter the message (force: true to publish anyway)`);
        }
      }
      const reply = d.runCommand({
        update: names.messages,
        updates: [{
          q: { _id: built.id, ts: { $exists: false } },
          u: {
            $setOnInsert: built.body,
            $currentDate: { ts: { $type: "timestamp" }, at: { $type: "date" } },
          },
          upsert: true,
        }],
        ordered: true,
      });
      const error = reply.writeErrors && reply.writeErrors[0];
      if (error && error.code === 11000) {
        return { id: built.id, duplicate: true };
      }
      if (error) {
        const e = new Error(`message ${built.id} refused: ${error.code} ${error.errmsg}`);
        e.code = error.code;
        e.writeError = error;
        throw e;
      }
      if (reply.ok !== 1 && reply.ok !== 1.0) throw new Error("update failed: " + compact(reply));
      return { id: built.id, duplicate: false };
    }

    docs.publish = publishDoc;
    docs.message = (spec) => buildMessage(spec).body;

    // ---- printing helpers ----------------------------------------------------------

    function printRows(rows, show, empty) {
      if (rows.length === 0) print(empty);
      for (const r of rows) print(show(r));
    }

    const kit = {
      db: d,
      names: names,
      docs: docs,
      newId: newId,

      recent(n, filter) { printRows(docs.recent(n, filter), line, "(no messages)"); },
      find(spec, n) { printRows(docs.find(spec, n), line, "(no messages)"); },
      byAction(action, n) { printRows(docs.byAction(action, n), line, `(no messages with action ${action})`); },
      byService(service, n) { printRows(docs.byService(service, n), line, `(no messages from or to ${service})`); },
      byState(state, n) { printRows(docs.byState(state, n), line, `(no messages in state ${state})`); },
      get(id) { const m = docs.get(id); print(m ? line(m) : `(no message ${id})`); },

      request(queryId) {
        const found = docs.request(queryId);
        if (found.length === 0) { print(`(no request with queryId ${queryId})`); return; }
        found.forEach((m) => {
          print(line(m));
          const waited = m.response_ts && m.query_ts ? (num(m.response_ts) - num(m.query_ts)) / 1e6 : null;
          if (waited !== null) print(`  answered ${waited.toFixed(1)} ms after it was sent (clocks of the sender and the worker)`);
        });
      },

      pending() {
        printRows(docs.pending(), (q) =>
          `${q.service} ${q.action}  waiting=${q.waiting} held=${q.held} backoff=${q.backoff} expired=${q.expired} oldest=${showDate(q.oldest)}`,
        "(no pending work)");
      },

      expiredLeases(n) {
        printRows(docs.expiredLeases(n), (m) =>
          `${line(m)}  leaseEnded=${showDate(m.leaseEnded)} serverTime=${showDate(m.serverTime)}`,
        "(no expired leases)");
      },

      dead(n, filter) {
        printRows(docs.dead(n, filter), (x) =>
          `${showDate(x.at)}  ${x._id}  reason=${JSON.stringify(x.reason)}  origin=${x.origin || "-"}  document=${compact(x.document)}`,
        "(no dead letters)");
      },

      checkpoints() {
        printRows(docs.checkpoints(), (c) => {
          const pos = c.position || {};
          const id = pos.token && pos.token.id ? pos.token.id : "-";
          return `${c._id}  ts=${showTs(pos.ts)}  id=${id}  updatedAt=${showDate(c.updatedAt)}`;
        }, "(no checkpoints)");
      },

      lag() {
        printRows(docs.lag(), (l) =>
          `${l.name}  behind=${l.behind}  seconds=${l.seconds}  at=${showTs(l.ts)} ${l.id || ""}`,
        "(no named subscriptions)");
      },

      catalog() {
        printRows(docs.catalog(), (c) => `${c._id}: ${(c.actions || []).slice().sort().join(", ")}`, "(empty catalog)");
      },

      // Follows new messages as they are published (a change stream on inserts), until
      // Ctrl-C, or `maxEvents` messages, or `maxTimeMS` milliseconds without the limit.
      tail(filter, options) {
        const o = options || {};
        const match = { operationType: "insert" };
        for (const [k, v] of Object.entries(filter || {})) match["fullDocument." + k] = v;
        const stream = messages.watch([{ $match: match }], { maxAwaitTimeMS: 500 });
        const stopAt = o.maxTimeMS ? Date.now() + o.maxTimeMS : Infinity;
        let seen = 0;
        try {
          // The stream opens on its first read: say so once it follows.
          let event = stream.tryNext();
          print("(following " + names.messages + (o.maxEvents ? ` for ${o.maxEvents} message(s)` : "") + "; Ctrl-C stops)");
          while (true) {
            if (event !== null) {
              print(line(event.fullDocument));
              seen += 1;
            }
            if (Date.now() >= stopAt || (o.maxEvents && seen >= o.maxEvents)) break;
            event = stream.tryNext();
          }
        } finally {
          stream.close();
        }
      },

      publish(spec) {
        const r = publishDoc(spec);
        print(r.duplicate ? `already published: ${r.id}` : `published: ${r.id}`);
        return r.id;
      },

      help() {
        print([
          "intracom kit (database " + dbName + ", messages in `" + names.messages + "`)",
          "  ic.recent(n=20, filter)          newest messages, shown in the bus's order (ts, _id)",
          "  ic.tail(filter, {maxEvents, maxTimeMS})   follow new messages (change stream)",
          "  ic.find({action, from, to, service, state, type, queryId}, n)",
          "  ic.byAction(a, n)  ic.byService(s, n)  ic.byState(st, n)  ic.get(id)",
          "  ic.request(queryId)              a request and its outcome",
          "  ic.pending()                     pending work per (service, action), leases by the server's clock",
          "  ic.expiredLeases(n)              pending work whose lease ended",
          "  ic.dead(n, filter)               dead letters",
          "  ic.checkpoints()  ic.lag()       named subscriptions: position, messages and seconds behind",
          "  ic.catalog()                     services and their actions",
          "  ic.publish({from, to, action, body, instance, instanceDest, type, work, request, priority, traceparent, tracestate, id, force})",
          "  ic.docs.<helper>(...)            the same, returning documents instead of printing",
        ].join("\n"));
      },
    };
    return kit;
  }

  global.intracom = intracom;
})(globalThis);
