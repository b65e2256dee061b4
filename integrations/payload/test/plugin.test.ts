import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { syncEnginePlugin } from "@sync-engine/payload";
import { payloadApp } from "../../test-support/payload-app.ts";
import { newSecret, recordingLogger, signedDelivery, sleep, TestStream } from "../../test-support/support.ts";

const EVENT_ID = /^[A-Za-z0-9_:-]{1,128}$/;

describe("Payload plugin with a real JetStream stream", () => {
  let stream: TestStream;
  let app: Awaited<ReturnType<typeof payloadApp>>;
  let baseUrl: string;
  const secret = newSecret();
  const logger = recordingLogger();

  before(async () => {
    stream = await TestStream.create();
    app = await payloadApp({ subjectPrefix: stream.prefix, secret, logger });
    baseUrl = await app.listen();
  });
  after(async () => {
    await app?.close();
    await stream?.remove();
  });

  async function deliver(delivery: { headers: Record<string, string>; body: string }) {
    const response = await fetch(`${baseUrl}/api/sync/webhook`, { method: "POST", headers: delivery.headers, body: delivery.body });
    return { status: response.status, body: await response.json().catch(() => null) };
  }

  test("create, update and delete publish Payload-origin envelopes", async () => {
    const start = await stream.count();
    const before = Date.now();
    const doc = await app.payload.create({
      collection: "users",
      data: { email: "ada@example.com", fullName: "Ada Lovelace", betterAuthUserId: "u_ada" },
    });
    await app.payload.update({ collection: "users", id: doc.id, data: { fullName: "Ada King" } });
    await app.payload.delete({ collection: "users", id: doc.id });
    const after = Date.now();
    const messages = (await stream.waitFor(start + 3)).slice(start);
    assert.deepEqual(
      messages.map((m) => m.subject),
      ["created", "updated", "deleted"].map((verb) => `${stream.prefix}.payload.user.${verb}.u_ada`),
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
    const start = await stream.count();
    const doc = await app.payload.create({ collection: "users", data: { email: "local@example.com", fullName: "Local Only" } });
    await app.payload.update({ collection: "users", id: doc.id, data: { fullName: "Still Local" } });
    await app.payload.delete({ collection: "users", id: doc.id });
    await sleep(300);
    assert.equal(await stream.count(), start);
  });

  test("a signed delivery is applied through the Local API and not published again", async () => {
    const start = await stream.count();
    const published = app.plugin.stats.published;
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
    let doc = await app.findByAuthId("u_grace");
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
    doc = await app.findByAuthId("u_grace");
    assert.equal(doc?.fullName, "Rear Admiral Hopper");
    assert.equal(doc?.email, "grace@navy.mil");

    // The same webhook-id again is acknowledged and not applied again.
    await app.payload.update({ collection: "users", id: doc!.id, data: { bio: "local edit" }, context: {} });
    await app.payload.update({ collection: "users", id: doc!.id, data: { fullName: "Local Name" } });
    const duplicate = await deliver(update);
    assert.equal(duplicate.status, 200);
    assert.equal(duplicate.body.result, "duplicate");
    assert.equal((await app.findByAuthId("u_grace"))?.fullName, "Local Name");

    const deleted = await deliver(
      signedDelivery(secret, { id: "evt-d-1", origin: "better-auth", type: "user.deleted", timestamp: Date.now(), data: { betterAuthUserId: "u_grace" } }),
    );
    assert.equal(deleted.status, 200);
    assert.equal(await app.findByAuthId("u_grace"), null);
    const deletedAgain = await deliver(
      signedDelivery(secret, { id: "evt-d-2", origin: "better-auth", type: "user.deleted", timestamp: Date.now(), data: { betterAuthUserId: "u_grace" } }),
    );
    assert.equal(deletedAgain.status, 200);
    assert.equal(deletedAgain.body.result, "absent");

    // Only the two local edits were published.
    await sleep(300);
    const messages = (await stream.messages()).slice(start);
    assert.deepEqual(
      messages.map((m) => [m.envelope.type, m.envelope.data.fullName]),
      [["user.updated", "Rear Admiral Hopper"], ["user.updated", "Local Name"]],
    );
    assert.equal(app.plugin.stats.published, published + 2);
  });

  test("a bad signature is refused with 401 and changes nothing", async () => {
    await app.payload.create({ collection: "users", data: { email: "b@example.com", fullName: "Barbara", betterAuthUserId: "u_barbara" } });
    const start = await stream.count();
    const envelope = {
      id: "evt-bad-1",
      origin: "better-auth",
      type: "user.updated",
      timestamp: Date.now(),
      data: { betterAuthUserId: "u_barbara", email: "b@example.com", fullName: "Mallory" },
    };
    assert.equal((await deliver(signedDelivery(newSecret(), envelope))).status, 401);
    const tampered = signedDelivery(secret, envelope);
    tampered.body = tampered.body.replace("Mallory", "Mallory2");
    assert.equal((await deliver(tampered)).status, 401);
    const unsigned = signedDelivery(secret, envelope);
    delete unsigned.headers["webhook-signature"];
    assert.equal((await deliver(unsigned)).status, 401);
    const forNewUser = signedDelivery(newSecret(), { ...envelope, id: "evt-bad-2", type: "user.created", data: { betterAuthUserId: "u_evil", email: "e@x.com" } });
    assert.equal((await deliver(forNewUser)).status, 401);
    assert.equal((await app.findByAuthId("u_barbara"))?.fullName, "Barbara");
    assert.equal(await app.findByAuthId("u_evil"), null);
    await sleep(200);
    assert.equal(await stream.count(), start);
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
      const response = await fetch(`${url}/api/sync/webhook`, { method: "POST", headers: delivery.headers, body: delivery.body });
      assert.equal(response.status, 200, await response.text());
      assert.equal((await app.findByAuthId("u_auth"))?.email, "auth@example.com");
      await sleep(200);
      assert.equal(await stream.count(), 0);
    } finally {
      await app.close();
      await stream.remove();
    }
  });

  test("NATS unreachable: the write succeeds, the failure is logged and counted", async () => {
    const logger = recordingLogger();
    const app = await payloadApp({ servers: "nats://127.0.0.1:1", secret: newSecret(), logger });
    try {
      await app.payload.create({ collection: "users", data: { email: "off@example.com", fullName: "Off", betterAuthUserId: "u_off" } });
      assert.equal((await app.findByAuthId("u_off"))?.email, "off@example.com");
      assert.equal(app.plugin.stats.failed, 1);
      const errors = logger.lines.filter((l) => l.level === "error").map((l) => l.message);
      assert.equal(errors.length, 1);
      assert.match(errors[0], /could not publish user\.created .*unreachable/);
      assert.match(errors[0], /sync-engine reconcile/);
    } finally {
      await app.close();
    }
  });

  test("configuration errors are clear", () => {
    const saved = process.env.PAYLOAD_WEBHOOK_SECRET;
    delete process.env.PAYLOAD_WEBHOOK_SECRET;
    try {
      assert.throws(() => syncEnginePlugin({}), /PAYLOAD_WEBHOOK_SECRET/);
    } finally {
      if (saved !== undefined) process.env.PAYLOAD_WEBHOOK_SECRET = saved;
    }
    const plugin = syncEnginePlugin({ secret: newSecret(), collection: "members" });
    assert.throws(() => plugin({ collections: [{ slug: "users", fields: [] }] } as any), /no collection "members"/);
    const plugin2 = syncEnginePlugin({ secret: newSecret() });
    assert.throws(() => plugin2({ collections: [{ slug: "users", fields: [] }] } as any), /no field "betterAuthUserId"/);
  });
});

test("the shared module is identical in both packages", async () => {
  const { readFile } = await import("node:fs/promises");
  const here = new URL("../src/common.ts", import.meta.url);
  const there = new URL("../../better-auth/src/common.ts", import.meta.url);
  assert.equal(await readFile(here, "utf8"), await readFile(there, "utf8"));
});
