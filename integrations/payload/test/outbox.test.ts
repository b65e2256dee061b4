// The Payload plugin's outbox against a real JetStream behind a TCP relay that the test cuts:
// writes made while NATS is down succeed at once, wait in Payload's database, survive a restart,
// and reach JetStream in order once NATS is back; a write rolled back publishes nothing.
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { outboxWorld, restartDuringAnOutage, writesDuringAnOutage, type OutboxSubject } from "../../test-support/outbox-scenarios.ts";
import { payloadApp } from "../../test-support/payload-app.ts";
import { sleep } from "../../test-support/support.ts";

const WRITES = 200;
type App = Awaited<ReturnType<typeof payloadApp>>;

describe("Payload plugin outbox, NATS cut by a relay", () => {
  const world = outboxWorld();

  const subject: OutboxSubject<App> = {
    newApp: () => payloadApp(world.options()),
    restartedApp: (first) => payloadApp(world.options(), { dir: first.dir }),
    async write(app, tag, i) {
      const key = `${tag}_${i}`;
      await app.payload.create({ collection: "users", data: { email: `${key}@example.com`, fullName: `${tag} ${i}`, betterAuthUserId: key } });
      return key;
    },
    keyOf: (data) => String(data.betterAuthUserId),
  };

  test(`${WRITES} writes while NATS is down all succeed, then all reach JetStream in order`, async () => {
    console.log(`payload outbox: ${await writesDuringAnOutage(subject, world.stream, world.relay, WRITES)}`);
  });

  test("the app restarted while NATS is down loses nothing", () => restartDuringAnOutage(subject, world.stream, world.relay));

  test("with transactions, a write that fails after afterChange publishes nothing", async () => {
    const app = await payloadApp(world.options(), { transactions: true });
    try {
      const start = await world.stream.count();
      await assert.rejects(
        app.payload.create({ collection: "users", data: { email: "rb@example.com", bio: "rollback", betterAuthUserId: "u_rollback" } }),
        /a later hook failed/,
      );
      assert.equal(await app.findByAuthId("u_rollback"), null, "the write was rolled back");
      await app.payload.create({ collection: "users", data: { email: "ok@example.com", betterAuthUserId: "u_committed" } });
      assert.ok(await app.plugin.drained(10_000));
      await sleep(300); // a late publish of the rolled-back event would land by now
      const published = (await world.stream.messages()).slice(start).map((m) => String(m.envelope.data.betterAuthUserId));
      assert.deepEqual(published, ["u_committed"], "only the committed write's event");
    } finally {
      await app.close();
    }
  });
});
