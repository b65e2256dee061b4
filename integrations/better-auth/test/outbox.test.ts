// The Better Auth plugin's outbox against a real JetStream behind a TCP relay that the test cuts:
// writes made while NATS is down succeed at once, wait in the app's database, survive a restart,
// and reach JetStream in order once NATS is back.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { betterAuthApp } from "../../test-support/better-auth-app.ts";
import { Relay } from "../../test-support/relay.ts";
import { newSecret, postgresDatabase, recordingLogger, TestStream } from "../../test-support/support.ts";

const WRITES = 200;

for (const backend of ["sqlite", "postgres"] as const) describe(`Better Auth plugin outbox on ${backend}, NATS cut by a relay`, () => {
  let stream: TestStream;
  let relay: Relay;
  let database: Awaited<ReturnType<typeof postgresDatabase>> | undefined;
  before(async () => {
    stream = await TestStream.create();
    relay = await Relay.start(4222);
  });
  after(async () => {
    await relay?.close();
    await stream?.remove();
  });

  /** A new app on its own database (a new PostgreSQL database each time on `postgres`). */
  async function newApp() {
    if (backend === "sqlite") return betterAuthApp(options());
    await database?.drop();
    database = await postgresDatabase("ba_outbox");
    return betterAuthApp(options(), { postgres: database.url });
  }

  /** The same app started again on its database. */
  function restartedApp(first: Awaited<ReturnType<typeof betterAuthApp>>) {
    return betterAuthApp(options(), backend === "sqlite" ? { dir: first.dir } : { postgres: database!.url });
  }

  const options = () => ({
    servers: relay.url("nats"),
    subjectPrefix: stream.prefix,
    secret: newSecret(),
    logger: recordingLogger(),
    publishTimeoutMs: 1000,
  });

  /** Creates users through Better Auth (its hooks run), one after the other; returns their ids and the slowest write. */
  async function writeUsers(app: Awaited<ReturnType<typeof betterAuthApp>>, tag: string, n: number) {
    const ids: string[] = [];
    let slowest = 0;
    for (let i = 0; i < n; i++) {
      const started = performance.now();
      const user = await app.context.internalAdapter.createUser({ email: `${tag}-${i}@example.com`, name: `${tag} ${i}`, emailVerified: false }, { method: "test" });
      slowest = Math.max(slowest, performance.now() - started);
      ids.push(user.id);
    }
    return { ids, slowest };
  }

  async function createdIdsInStream(from: number): Promise<string[]> {
    return (await stream.messages())
      .slice(from)
      .filter((m) => m.envelope.type === "user.created")
      .map((m) => String(m.envelope.data.id));
  }

  test(`${WRITES} writes while NATS is down all succeed, then all reach JetStream in order`, async () => {
    const app = await newApp();
    try {
      await writeUsers(app, "warm", 1);
      assert.ok(await app.plugin.drained(10_000), "published while NATS is up");
      const start = await stream.count();

      relay.cut();
      const { ids, slowest } = await writeUsers(app, "cut", WRITES);
      const during = await app.plugin.outbox();
      assert.equal(await stream.count(), start, "nothing reached JetStream while it was cut off");
      assert.equal(during.pending, WRITES, "every write waits in the outbox");
      assert.ok(during.oldestAgeMs > 0);

      relay.restore();
      const restored = performance.now();
      assert.ok(await app.plugin.drained(30_000), "the outbox empties once NATS is back");
      const drainedAfter = performance.now() - restored;
      assert.deepEqual(await createdIdsInStream(start), ids, "every event, once, in write order");
      const done = await app.plugin.outbox();
      assert.equal(done.pending, 0);
      console.log(
        `outbox on ${backend}: ${WRITES} writes during the cut, slowest ${slowest.toFixed(1)} ms; ` +
          `all published ${drainedAfter.toFixed(0)} ms after the restore (${done.failed} publish attempts failed during the cut)`,
      );
    } finally {
      relay.restore();
      await app.close();
    }
  });

  test("the app restarted while NATS is down loses nothing", async () => {
    const first = await newApp();
    const start = await stream.count();
    relay.cut();
    const { ids } = await writeUsers(first, "restart", 50);
    assert.equal((await first.plugin.outbox()).pending, 50);
    await first.stop();

    const second = await restartedApp(first);
    try {
      assert.equal((await second.plugin.outbox()).pending, 50, "the rows survived the restart");
      relay.restore();
      assert.ok(await second.plugin.drained(30_000), "the restarted app publishes what the first left");
      assert.deepEqual(await createdIdsInStream(start), ids, "every event, once, in write order");
    } finally {
      relay.restore();
      await second.close();
      await database?.drop();
      database = undefined;
    }
  });
});
