// The Payload plugin's outbox against a real JetStream behind a TCP relay that the test cuts:
// writes made while NATS is down succeed at once, wait in Payload's database, survive a restart,
// and reach JetStream in order once NATS is back; a write rolled back publishes nothing.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { payloadApp } from "../../test-support/payload-app.ts";
import { Relay } from "../../test-support/relay.ts";
import { newSecret, recordingLogger, sleep, TestStream } from "../../test-support/support.ts";

const WRITES = 200;

describe("Payload plugin outbox, NATS cut by a relay", () => {
  let stream: TestStream;
  let relay: Relay;
  before(async () => {
    stream = await TestStream.create();
    relay = await Relay.start(4222);
  });
  after(async () => {
    await relay?.close();
    await stream?.remove();
  });

  const options = () => ({
    servers: relay.url("nats"),
    subjectPrefix: stream.prefix,
    secret: newSecret(),
    logger: recordingLogger(),
    publishTimeoutMs: 1000,
  });

  /** Creates linked users through the Local API (the plugin's hooks run); returns their keys and the slowest write. */
  async function writeUsers(app: Awaited<ReturnType<typeof payloadApp>>, tag: string, n: number) {
    const keys: string[] = [];
    let slowest = 0;
    for (let i = 0; i < n; i++) {
      const key = `${tag}_${i}`;
      const started = performance.now();
      await app.payload.create({ collection: "users", data: { email: `${key}@example.com`, fullName: `${tag} ${i}`, betterAuthUserId: key } });
      slowest = Math.max(slowest, performance.now() - started);
      keys.push(key);
    }
    return { keys, slowest };
  }

  async function createdKeysInStream(from: number): Promise<string[]> {
    return (await stream.messages())
      .slice(from)
      .filter((m) => m.envelope.type === "user.created")
      .map((m) => String(m.envelope.data.betterAuthUserId));
  }

  test(`${WRITES} writes while NATS is down all succeed, then all reach JetStream in order`, async () => {
    const app = await payloadApp(options());
    try {
      await writeUsers(app, "warm", 1);
      assert.ok(await app.plugin.drained(10_000), "published while NATS is up");
      const start = await stream.count();

      relay.cut();
      const { keys, slowest } = await writeUsers(app, "cut", WRITES);
      const during = await app.plugin.outbox();
      assert.equal(await stream.count(), start, "nothing reached JetStream while it was cut off");
      assert.equal(during.pending, WRITES, "every write waits in the outbox");

      relay.restore();
      const restored = performance.now();
      assert.ok(await app.plugin.drained(30_000), "the outbox empties once NATS is back");
      const drainedAfter = performance.now() - restored;
      assert.deepEqual(await createdKeysInStream(start), keys, "every event, once, in write order");
      const done = await app.plugin.outbox();
      console.log(
        `payload outbox: ${WRITES} writes during the cut, slowest ${slowest.toFixed(1)} ms; ` +
          `all published ${drainedAfter.toFixed(0)} ms after the restore (${done.failed} publish attempts failed during the cut)`,
      );
    } finally {
      relay.restore();
      await app.close();
    }
  });

  test("the app restarted while NATS is down loses nothing", async () => {
    const first = await payloadApp(options());
    const start = await stream.count();
    relay.cut();
    const { keys } = await writeUsers(first, "restart", 50);
    assert.equal((await first.plugin.outbox()).pending, 50);
    await first.stop();

    const second = await payloadApp(options(), { dir: first.dir });
    try {
      assert.equal((await second.plugin.outbox()).pending, 50, "the rows survived the restart");
      relay.restore();
      assert.ok(await second.plugin.drained(30_000), "the restarted app publishes what the first left");
      assert.deepEqual(await createdKeysInStream(start), keys, "every event, once, in write order");
    } finally {
      relay.restore();
      await second.close();
    }
  });

  test("with transactions, a write that fails after afterChange publishes nothing", async () => {
    const app = await payloadApp(options(), { transactions: true });
    try {
      const start = await stream.count();
      await assert.rejects(
        app.payload.create({ collection: "users", data: { email: "rb@example.com", bio: "rollback", betterAuthUserId: "u_rollback" } }),
        /a later hook failed/,
      );
      assert.equal(await app.findByAuthId("u_rollback"), null, "the write was rolled back");
      await app.payload.create({ collection: "users", data: { email: "ok@example.com", betterAuthUserId: "u_committed" } });
      assert.ok(await app.plugin.drained(10_000));
      await sleep(300); // a late publish of the rolled-back event would land by now
      assert.deepEqual(await createdKeysInStream(start), ["u_committed"], "only the committed write's event");
    } finally {
      await app.close();
    }
  });
});
