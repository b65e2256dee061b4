import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { syncEnginePlugin } from "@sync-engine/payload";
import { payloadApp } from "../../test-support/payload-app.ts";
import {
  badlySigned,
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

describe("Payload plugin with a real JetStream stream", () => {
  const live = liveApp((options) => payloadApp(options), "/api/sync/webhook");
  const { secret, deliver } = live;

  test("create, update and delete publish Payload-origin envelopes", async () => {
    const start = await live.stream.count();
    const before = Date.now();
    const doc = await live.app.payload.create({
      collection: "users",
      data: { email: "ada@example.com", fullName: "Ada Lovelace", betterAuthUserId: "u_ada" },
    });
    await live.app.payload.update({ collection: "users", id: doc.id, data: { fullName: "Ada King" } });
    await live.app.payload.delete({ collection: "users", id: doc.id });
    const after = Date.now();
    const messages = (await live.stream.waitFor(start + 3)).slice(start);
    assert.deepEqual(
      messages.map((m) => m.subject),
      ["created", "updated", "deleted"].map((verb) => `${live.stream.prefix}.payload.user.${verb}.u_ada`),
    );
    for (const [i, message] of messages.entries()) {
      const envelope = message.envelope;
      assert.match(envelope.id, EVENT_ID);
      assert.equal(message.msgId, envelope.id);
      assert.equal(envelope.origin, "payload");
      assert.equal(envelope.type, ["user.created", "user.updated", "user.deleted"][i]);
      assert.ok(Number.isInteger(envelope.timestamp) && envelope.timestamp >= before && envelope.timestamp <= after);
      assert.equal(envelope.data.betterAuthUserId, "u_ada");
      assert.equal(envelope.data.email, "ada@example.com");
      assert.equal("id" in envelope.data, false, "Payload's own id is not published");
    }
    assert.equal(messages[0].envelope.data.fullName, "Ada Lovelace");
    assert.equal(messages[1].envelope.data.fullName, "Ada King");
  });

  test("documents without betterAuthUserId are not published", async () => {
    const start = await live.stream.count();
    const doc = await live.app.payload.create({ collection: "users", data: { email: "local@example.com", fullName: "Local Only" } });
    await live.app.payload.update({ collection: "users", id: doc.id, data: { fullName: "Still Local" } });
    await live.app.payload.delete({ collection: "users", id: doc.id });
    await sleep(300);
    assert.equal(await live.stream.count(), start);
  });

  test("a signed delivery is applied through the Local API and not published again", async () => {
    const start = await live.stream.count();
    const published = live.app.plugin.stats.published;
    const created = await deliver(
      signedDelivery(secret, {
        id: "evt-c-1",
        origin: "better-auth",
        type: "user.created",
        timestamp: Date.now(),
        data: { betterAuthUserId: "u_grace", email: "grace@example.com", fullName: "Grace Hopper", emailVerified: false, image: null },
      }),
    );
    assert.equal(created.status, 200, JSON.stringify(created.body));
    let doc = await live.app.findByAuthId("u_grace");
    assert.equal(doc?.fullName, "Grace Hopper");
    assert.equal(doc?.email, "grace@example.com");

    const update = signedDelivery(secret, {
      id: "evt-u-1",
      origin: "better-auth",
      type: "user.updated",
      timestamp: Date.now(),
      data: { betterAuthUserId: "u_grace", email: "grace@navy.mil", fullName: "Rear Admiral Hopper" },
    });
    assert.equal((await deliver(update)).status, 200);
    doc = await live.app.findByAuthId("u_grace");
    assert.equal(doc?.fullName, "Rear Admiral Hopper");
    assert.equal(doc?.email, "grace@navy.mil");

    // The same webhook-id again is acknowledged and not applied again.
    await live.app.payload.update({ collection: "users", id: doc!.id, data: { bio: "local edit" }, context: {} });
    await live.app.payload.update({ collection: "users", id: doc!.id, data: { fullName: "Local Name" } });
    const duplicate = await deliver(update);
    assert.equal(duplicate.status, 200);
    assert.equal(duplicate.body.result, "duplicate");
    assert.equal((await live.app.findByAuthId("u_grace"))?.fullName, "Local Name");

    const deleted = await deliver(
      signedDelivery(secret, { id: "evt-d-1", origin: "better-auth", type: "user.deleted", timestamp: Date.now(), data: { betterAuthUserId: "u_grace" } }),
    );
    assert.equal(deleted.status, 200);
    assert.equal(await live.app.findByAuthId("u_grace"), null);
    const deletedAgain = await deliver(
      signedDelivery(secret, { id: "evt-d-2", origin: "better-auth", type: "user.deleted", timestamp: Date.now(), data: { betterAuthUserId: "u_grace" } }),
    );
    assert.equal(deletedAgain.status, 200);
    assert.equal(deletedAgain.body.result, "absent");

    // Only the two local edits were published.
    await sleep(300);
    const messages = (await live.stream.messages()).slice(start);
    assert.deepEqual(
      messages.map((m) => [m.envelope.type, m.envelope.data.fullName]),
      [["user.updated", "Rear Admiral Hopper"], ["user.updated", "Local Name"]],
    );
    assert.equal(live.app.plugin.stats.published, published + 2);
  });

  test("a bad signature is refused with 401 and changes nothing", async () => {
    await live.app.payload.create({ collection: "users", data: { email: "b@example.com", fullName: "Barbara", betterAuthUserId: "u_barbara" } });
    const start = await live.published();
    const envelope = {
      id: "evt-bad-1",
      origin: "better-auth",
      type: "user.updated",
      timestamp: Date.now(),
      data: { betterAuthUserId: "u_barbara", email: "b@example.com", fullName: "Mallory" },
    };
    for (const [what, delivery] of Object.entries(badlySigned(secret, envelope))) {
      assert.equal((await deliver(delivery)).status, 401, what);
    }
    const forNewUser = signedDelivery(newSecret(), { ...envelope, id: "evt-bad-2", type: "user.created", data: { betterAuthUserId: "u_evil", email: "e@x.com" } });
    assert.equal((await deliver(forNewUser)).status, 401);
    assert.equal((await live.app.findByAuthId("u_barbara"))?.fullName, "Barbara");
    assert.equal(await live.app.findByAuthId("u_evil"), null);
    await sleep(200);
    assert.equal(await live.stream.count(), start);
  });

  test("a delivery without betterAuthUserId is refused with 400", async () => {
    const result = await deliver(
      signedDelivery(secret, { id: "evt-nokey", origin: "better-auth", type: "user.updated", timestamp: Date.now(), data: { email: "x@example.com" } }),
    );
    assert.equal(result.status, 400);
  });
});

describe("Payload plugin options", () => {
  test("an auth-enabled users collection: created users get a random password", async () => {
    const stream = await TestStream.create();
    const secret = newSecret();
    const app = await payloadApp({ subjectPrefix: stream.prefix, secret }, { authUsers: true });
    try {
      const url = await app.listen();
      const delivery = signedDelivery(secret, {
        id: "evt-auth-1",
        origin: "better-auth",
        type: "user.created",
        timestamp: Date.now(),
        data: { betterAuthUserId: "u_auth", email: "auth@example.com", fullName: "Auth User" },
      });
      const response = await postDelivery(`${url}/api/sync/webhook`, delivery);
      assert.equal(response.status, 200, JSON.stringify(response.body));
      assert.equal((await app.findByAuthId("u_auth"))?.email, "auth@example.com");
      await sleep(200);
      assert.equal(await stream.count(), 0);
    } finally {
      await app.close();
      await stream.remove();
    }
  });

  test("NATS unreachable: the write succeeds at once, the event waits in the outbox, the failure is logged and counted", async () => {
    const logger = recordingLogger();
    const app = await payloadApp({ servers: "nats://127.0.0.1:1", secret: newSecret(), logger });
    try {
      await app.payload.create({ collection: "users", data: { email: "off@example.com", fullName: "Off", betterAuthUserId: "u_off" } });
      assert.equal((await app.findByAuthId("u_off"))?.email, "off@example.com");
      await eventually("a failed publish attempt", async () => (await app.plugin.outbox()).failed > 0);
      const outbox = await app.plugin.outbox();
      assert.equal(outbox.pending, 1, "the event waits in the app's database");
      assert.match(outbox.lastError ?? "", /unreachable/);
      const warnings = logger.lines.filter((l) => l.level === "warn").map((l) => l.message);
      assert.equal(warnings.length, 1, "logged once, not per attempt");
      assert.match(warnings[0], /outbox: publishing paused \(NATS is unreachable/);
    } finally {
      await app.close();
    }
  });

  test("configuration errors are clear", () => {
    withoutEnv("PAYLOAD_WEBHOOK_SECRET", () => assert.throws(() => syncEnginePlugin({}), /PAYLOAD_WEBHOOK_SECRET/));
    const plugin = syncEnginePlugin({ secret: newSecret(), collection: "members" });
    assert.throws(() => plugin({ collections: [{ slug: "users", fields: [] }] } as any), /no collection "members"/);
    const plugin2 = syncEnginePlugin({ secret: newSecret() });
    assert.throws(() => plugin2({ collections: [{ slug: "users", fields: [] }] } as any), /no field "betterAuthUserId"/);
  });
});
