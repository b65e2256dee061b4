// The outbox scenarios both plugins must pass against a real JetStream behind a relay the test
// cuts: writes during the outage succeed at once and wait in the app's database, then reach
// JetStream once, in write order; a restart during the outage loses nothing.
import assert from "node:assert/strict";
import { after, before } from "node:test";
import type { OutboxStats } from "@sync-engine/common";
import { Relay } from "./relay.ts";
import { newSecret, recordingLogger, TestStream } from "./support.ts";

/**
 * For a describe(): a TestStream and a relay in front of NATS, made before its tests and removed
 * after them, and the plugin options that publish through the relay to the stream.
 */
export function outboxWorld() {
  const world = {
    stream: undefined as unknown as TestStream,
    relay: undefined as unknown as Relay,
    options: () => ({
      servers: world.relay.url("nats"),
      subjectPrefix: world.stream.prefix,
      secret: newSecret(),
      logger: recordingLogger(),
      publishTimeoutMs: 1000,
    }),
  };
  before(async () => {
    world.stream = await TestStream.create();
    world.relay = await Relay.start(4222);
  });
  after(async () => {
    await world.relay?.close();
    await world.stream?.remove();
  });
  return world;
}

/** What a scenario needs of an app. */
export interface OutboxApp {
  plugin: { outbox(): Promise<OutboxStats>; drained(timeoutMs: number): Promise<boolean> };
  close(): Promise<void>;
  stop(): Promise<void>;
}

export interface OutboxSubject<App extends OutboxApp> {
  /** A new app on a database of its own. */
  newApp(): Promise<App>;
  /** The same app started again on `first`'s database. */
  restartedApp(first: App): Promise<App>;
  /** Makes user `i` tagged `tag` through the app (its hooks run); returns the user's key. */
  write(app: App, tag: string, i: number): Promise<string>;
  /** The user key a published envelope carries. */
  keyOf(data: Record<string, unknown>): string;
}

async function writeUsers<App extends OutboxApp>(subject: OutboxSubject<App>, app: App, tag: string, n: number) {
  const keys: string[] = [];
  let slowest = 0;
  for (let i = 0; i < n; i++) {
    const started = performance.now();
    keys.push(await subject.write(app, tag, i));
    slowest = Math.max(slowest, performance.now() - started);
  }
  return { keys, slowest };
}

async function createdKeys(stream: TestStream, from: number, keyOf: (data: Record<string, unknown>) => string) {
  return (await stream.messages())
    .slice(from)
    .filter((m) => m.envelope.type === "user.created")
    .map((m) => keyOf(m.envelope.data));
}

/** `n` writes with NATS cut all succeed and wait; after the restore all are published, in order. Returns a figures line. */
export async function writesDuringAnOutage<App extends OutboxApp>(subject: OutboxSubject<App>, stream: TestStream, relay: Relay, n: number) {
  const app = await subject.newApp();
  try {
    await writeUsers(subject, app, "warm", 1);
    assert.ok(await app.plugin.drained(10_000), "published while NATS is up");
    const start = await stream.count();

    relay.cut();
    const { keys, slowest } = await writeUsers(subject, app, "cut", n);
    const during = await app.plugin.outbox();
    assert.equal(await stream.count(), start, "nothing reached JetStream while it was cut off");
    assert.equal(during.pending, n, "every write waits in the outbox");
    assert.ok(during.oldestAgeMs > 0);

    relay.restore();
    const restored = performance.now();
    assert.ok(await app.plugin.drained(30_000), "the outbox empties once NATS is back");
    const drainedAfter = performance.now() - restored;
    assert.deepEqual(await createdKeys(stream, start, subject.keyOf), keys, "every event, once, in write order");
    const done = await app.plugin.outbox();
    assert.equal(done.pending, 0);
    return (
      `${n} writes during the cut, slowest ${slowest.toFixed(1)} ms; all published ${drainedAfter.toFixed(0)} ms ` +
      `after the restore (${done.failed} publish attempts failed during the cut)`
    );
  } finally {
    relay.restore();
    await app.close();
  }
}

/** The app stopped with events waiting and started again while NATS is down loses none. */
export async function restartDuringAnOutage<App extends OutboxApp>(subject: OutboxSubject<App>, stream: TestStream, relay: Relay) {
  const first = await subject.newApp();
  const start = await stream.count();
  relay.cut();
  const { keys } = await writeUsers(subject, first, "restart", 50);
  assert.equal((await first.plugin.outbox()).pending, 50);
  await first.stop();

  const second = await subject.restartedApp(first);
  try {
    assert.equal((await second.plugin.outbox()).pending, 50, "the rows survived the restart");
    relay.restore();
    assert.ok(await second.plugin.drained(30_000), "the restarted app publishes what the first left");
    assert.deepEqual(await createdKeys(stream, start, subject.keyOf), keys, "every event, once, in write order");
  } finally {
    relay.restore();
    await second.close();
  }
}
