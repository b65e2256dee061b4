// The Better Auth plugin's outbox, on SQLite and on PostgreSQL, against a real JetStream behind
// a TCP relay that the test cuts (test-support/outbox-scenarios.ts).
import { after, describe, test } from "node:test";
import { betterAuthApp } from "../../test-support/better-auth-app.ts";
import { outboxWorld, restartDuringAnOutage, writesDuringAnOutage, type OutboxSubject } from "../../test-support/outbox-scenarios.ts";
import { postgresDatabase } from "../../test-support/support.ts";

type App = Awaited<ReturnType<typeof betterAuthApp>>;

for (const backend of ["sqlite", "postgres"] as const) {
  describe(`Better Auth plugin outbox on ${backend}, NATS cut by a relay`, () => {
    const world = outboxWorld();
    let database: Awaited<ReturnType<typeof postgresDatabase>> | undefined;
    after(() => database?.drop());
    const subject: OutboxSubject<App> = {
      async newApp() {
        if (backend === "sqlite") return betterAuthApp(world.options());
        await database?.drop();
        database = await postgresDatabase("ba_outbox");
        return betterAuthApp(world.options(), { postgres: database.url });
      },
      restartedApp: (first) => betterAuthApp(world.options(), backend === "sqlite" ? { dir: first.dir } : { postgres: database!.url }),
      async write(app, tag, i) {
        const user = await app.context.internalAdapter.createUser(
          { email: `${tag}-${i}@example.com`, name: `${tag} ${i}`, emailVerified: false },
          { method: "test" },
        );
        return user.id;
      },
      keyOf: (data) => String(data.id),
    };

    test("200 writes while NATS is down all succeed, then all reach JetStream in order", async () => {
      console.log(`better-auth outbox on ${backend}: ${await writesDuringAnOutage(subject, world.stream, world.relay, 200)}`);
    });

    test("the app restarted while NATS is down loses nothing", () => restartDuringAnOutage(subject, world.stream, world.relay));
  });
}
