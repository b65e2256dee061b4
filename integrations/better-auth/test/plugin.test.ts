import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { syncEngine } from "@sync-engine/better-auth";
import { betterAuthApp } from "../../test-support/better-auth-app.ts";
import {
  badlySigned,
  type Delivery,
  EVENT_ID,
  eventually,
  liveApp,
  newSecret,
  postDelivery,
  recordingLogger,
  signedDelivery,
  sleep,
  TestStream,
  withoutEnv,
} from "../../test-support/support.ts";

describe("Better Auth plugin with a real JetStream stream", () => {
  const live = liveApp(betterAuthApp, "/api/auth/sync/webhook");
  const { secret, deliver } = live;

  test("sign-up, update and delete publish envelopes per PROTOCOL.md §1", async () => {
    const start = await live.stream.count();
    const before = Date.now();
    const { user, headers, password } = await live.app.signUp("ada@example.com", "Ada Lovelace");
    await live.app.auth.api.updateUser({ body: { name: "Ada King" }, headers });
    await live.app.auth.api.deleteUser({ body: { password }, headers });
    const after = Date.now();
    const messages = (await live.stream.waitFor(start + 3)).slice(start);
    assert.deepEqual(
      messages.map((m) => m.subject),
      ["created", "updated", "deleted"].map((verb) => `${live.stream.prefix}.user.${verb}.${user.id}`),
    );
    const [created, updated, deleted] = messages.map((m) => m.envelope);
    for (const [i, message] of messages.entries()) {
      const envelope = message.envelope;
      assert.match(envelope.id, EVENT_ID);
      assert.equal(message.msgId, envelope.id, "Nats-Msg-Id is the event id");
      assert.equal(envelope.origin, "better-auth");
      assert.equal(envelope.type, ["user.created", "user.updated", "user.deleted"][i]);
      assert.ok(Number.isInteger(envelope.timestamp) && envelope.timestamp >= before && envelope.timestamp <= after);
      assert.equal(envelope.data.id, user.id);
      assert.equal(envelope.data.email, "ada@example.com");
    }
    assert.equal(new Set(messages.map((m) => m.envelope.id)).size, 3, "ids are unique");
    assert.ok(created.timestamp <= updated.timestamp && updated.timestamp <= deleted.timestamp);
    assert.equal(created.data.name, "Ada Lovelace");
    assert.equal(updated.data.name, "Ada King");
    assert.equal(created.data.emailVerified, false);
    assert.equal(typeof created.data.createdAt, "string");
    assert.equal(new Date(created.data.createdAt).toISOString(), created.data.createdAt, "dates are ISO strings");
    assert.equal(await live.app.findUser(user.id), null);
  });

  test("a signed delivery is applied and not published again", async () => {
    const { user } = await live.app.signUp("grace@example.com", "Grace Hopper");
    const start = await live.published();
    const published = live.app.plugin.stats.published;

    const update = signedDelivery(secret, {
      id: "evt-upd-1",
      origin: "payload",
      type: "user.updated",
      timestamp: Date.now(),
      data: { id: user.id, email: "grace@navy.mil", name: "Rear Admiral Hopper", fullName: "ignored", unknownField: 1 },
    });
    const updated = await deliver(update);
    assert.equal(updated.status, 200, JSON.stringify(updated.body));
    let row = await live.app.findUser(user.id);
    assert.equal(row?.name, "Rear Admiral Hopper");
    assert.equal(row?.email, "grace@navy.mil");

    // The same webhook-id again is acknowledged without applying it again.
    await live.app.context.internalAdapter.updateUser(user.id, { name: "Local Edit" });
    const again = await deliver(update);
    assert.equal(again.status, 200);
    assert.equal(again.body.result, "duplicate");
    assert.equal((await live.app.findUser(user.id))?.name, "Local Edit");

    // A user this side does not have is created with the delivered id.
    const created = await deliver(
      signedDelivery(secret, {
        id: "evt-new-1",
        origin: "payload",
        type: "user.created",
        timestamp: Date.now(),
        data: { id: "u_from_payload_1", email: "Linus@Example.com", name: "Linus" },
      }),
    );
    assert.equal(created.status, 200, JSON.stringify(created.body));
    row = await live.app.findUser("u_from_payload_1");
    assert.equal(row?.email, "linus@example.com");
    assert.equal(row?.name, "Linus");

    const deleted = await deliver(
      signedDelivery(secret, { id: "evt-del-1", origin: "payload", type: "user.deleted", timestamp: Date.now(), data: { id: user.id } }),
    );
    assert.equal(deleted.status, 200, JSON.stringify(deleted.body));
    assert.equal(await live.app.findUser(user.id), null);

    // Exactly one event came from this test: the local edit. The receiver's writes published nothing.
    await sleep(300);
    const messages = (await live.stream.messages()).slice(start);
    assert.deepEqual(messages.map((m) => [m.envelope.type, m.envelope.data.name]), [["user.updated", "Local Edit"]]);
    assert.equal(live.app.plugin.stats.published, published + 1);
  });

  test("a bad signature is refused with 401 and changes nothing", async () => {
    const { user } = await live.app.signUp("barbara@example.com", "Barbara Liskov");
    const start = await live.published();
    const envelope = {
      id: "evt-bad-1",
      origin: "payload",
      type: "user.updated",
      timestamp: Date.now(),
      data: { id: user.id, email: "barbara@example.com", name: "Mallory" },
    };
    for (const [what, delivery] of Object.entries(badlySigned(secret, envelope))) {
      assert.equal((await deliver(delivery)).status, 401, what);
    }
    assert.equal((await live.app.findUser(user.id))?.name, "Barbara Liskov");
    // A refused delivery is not remembered: the correctly signed one still applies.
    assert.equal((await deliver(signedDelivery(secret, envelope))).status, 200);
    assert.equal((await live.app.findUser(user.id))?.name, "Mallory");
    await sleep(200);
    assert.equal(await live.stream.count(), start);
  });

  test("a malformed delivery is refused with 400", async () => {
    const bad = await deliver(
      signedDelivery(secret, { id: "evt-bad-type", origin: "payload", type: "user.exploded", timestamp: 1, data: { id: "x" } }),
    );
    assert.equal(bad.status, 400);
  });
});

describe("Better Auth plugin options", () => {
  test("`fields` limits the published data (id and email always go)", async () => {
    const stream = await TestStream.create();
    const app = await betterAuthApp({ subjectPrefix: stream.prefix, secret: newSecret(), fields: ["name"] });
    try {
      await app.signUp("alan@example.com", "Alan Turing");
      const [message] = await stream.waitFor(1);
      assert.deepEqual(Object.keys(message.envelope.data).sort(), ["email", "id", "name"]);
    } finally {
      await app.close();
      await stream.remove();
    }
  });

  test("secret rotation: any active secret verifies, as do several signatures in one header", async () => {
    const [oldSecret, newSecret1] = [newSecret(), newSecret()];
    const app = await betterAuthApp({ publish: false, secret: `${oldSecret} ${newSecret1}` });
    try {
      const url = await app.listen();
      const { user } = await app.signUp("rot@example.com", "Rot");
      const send = async (delivery: Delivery) => (await postDelivery(`${url}/api/auth/sync/webhook`, delivery)).status;
      const envelope = (n: number) => ({
        id: `evt-rot-${n}`,
        origin: "payload",
        type: "user.updated",
        timestamp: Date.now(),
        data: { id: user.id, email: "rot@example.com", name: `Rot ${n}` },
      });
      assert.equal(await send(signedDelivery(oldSecret, envelope(1))), 200);
      assert.equal(await send(signedDelivery(newSecret1, envelope(2))), 200);
      // The engine during its own rotation: one signature per secret, separated by a space.
      const third = envelope(3);
      const both = signedDelivery(newSecret(), third);
      const valid = signedDelivery(newSecret1, third);
      both.headers["webhook-timestamp"] = valid.headers["webhook-timestamp"];
      both.headers["webhook-signature"] = `${both.headers["webhook-signature"]} ${valid.headers["webhook-signature"]}`;
      assert.equal(await send(both), 200);
      assert.equal((await app.findUser(user.id))?.name, "Rot 3");
      assert.equal(await send(signedDelivery(newSecret(), envelope(4))), 401);
      assert.equal(app.plugin.stats.published + app.plugin.stats.failed, 0, "publish: false publishes nothing");
    } finally {
      await app.close();
    }
  });

  test("NATS unreachable: the write succeeds at once, the event waits in the outbox, the failure is logged and counted", async () => {
    const logger = recordingLogger();
    const app = await betterAuthApp({ servers: "nats://127.0.0.1:1", secret: newSecret(), logger });
    try {
      const { user } = await app.signUp("offline@example.com", "Off Line");
      assert.equal((await app.findUser(user.id))?.email, "offline@example.com");
      await eventually("a failed publish attempt", async () => (await app.plugin.outbox()).failed > 0);
      const outbox = await app.plugin.outbox();
      assert.equal(outbox.pending, 1, "the event waits in the app's database");
      assert.match(outbox.lastError ?? "", /unreachable/);
      assert.equal(app.plugin.stats.published, 0);
      const warnings = logger.lines.filter((l) => l.level === "warn").map((l) => l.message);
      assert.equal(warnings.length, 1, "logged once, not per attempt");
      assert.match(warnings[0], /outbox: publishing paused \(NATS is unreachable/);
    } finally {
      await app.close();
    }
  });

  test("no stream for the subjects: the write succeeds, the event waits, the failure is logged and counted", async () => {
    const logger = recordingLogger();
    const app = await betterAuthApp({ subjectPrefix: `nostream${Date.now()}`, secret: newSecret(), logger });
    try {
      await app.signUp("nostream@example.com", "No Stream");
      await eventually("a failed publish attempt", async () => (await app.plugin.outbox()).failed > 0);
      assert.equal((await app.plugin.outbox()).pending, 1);
      assert.match(logger.lines.find((l) => l.level === "warn")?.message ?? "", /no JetStream stream/);
    } finally {
      await app.close();
    }
  });

  test("a missing secret is a clear error at startup", () => {
    withoutEnv("BETTER_AUTH_WEBHOOK_SECRET", () => {
      assert.throws(() => syncEngine({}), /BETTER_AUTH_WEBHOOK_SECRET/);
      assert.throws(() => syncEngine({ secret: "not-base64!" }), /invalid webhook secret/);
    });
  });
});
