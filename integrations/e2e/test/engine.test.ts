// End to end: Better Auth and Payload, each with its plugin and served over HTTP, and the real
// sync-engine binary between them on a real JetStream stream.
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { randomUUID } from "node:crypto";
import { existsSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import Database from "libsql";
import { connect, type NatsConnection } from "nats";
import { betterAuthApp } from "../../test-support/better-auth-app.ts";
import { payloadApp } from "../../test-support/payload-app.ts";
import { Relay } from "../../test-support/relay.ts";
import { eventually, NATS_URL, newSecret, recordingLogger, sleep, tempDir } from "../../test-support/support.ts";

const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

/** The engine binary: $SYNC_ENGINE_BIN, else target/release or target/debug. Never skipped. */
function engineBinary(): string {
  const candidates = process.env.SYNC_ENGINE_BIN
    ? [process.env.SYNC_ENGINE_BIN]
    : [join(repo, "target/release/sync-engine"), join(repo, "target/debug/sync-engine")];
  const found = candidates.find((path) => existsSync(path));
  if (!found) {
    throw new Error(
      `sync-engine binary not found (looked at ${candidates.join(", ")}): build it with ` +
        "`cargo build --release -p engine` or set SYNC_ENGINE_BIN",
    );
  }
  return found;
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

const id = randomUUID().replace(/-/g, "").slice(0, 12);
const stream = `T_${id}`;
/** The engine makes one stream per application from its `nats.stream` base name. */
const streams = [`${stream}_BETTER_AUTH`, `${stream}_PAYLOAD`];
const prefix = `t${id}`;
const payloadSecret = newSecret();
const betterAuthSecret = newSecret();
const dir = tempDir("sync-e2e");
const configPath = join(dir.path, "config.toml");
const engineLog = join(dir.path, "engine.log");
let engine: ChildProcess | undefined;
let engineExit: string | undefined;
let httpPort = 0;
let nc: NatsConnection;
/** The apps reach NATS through it (the engine directly), so a test can cut the apps off. */
let appsNats: Relay;
let ba: Awaited<ReturnType<typeof betterAuthApp>>;
let pl: Awaited<ReturnType<typeof payloadApp>>;
/** The apps' own SQLite databases, opened beside them to plant drift the way SQL by hand does. */
let baDb: Database.Database;
let plDb: Database.Database;
const baLogger = recordingLogger();
const plLogger = recordingLogger();

function engineEnv() {
  return { ...process.env, TEST_PAYLOAD_SECRET: payloadSecret, TEST_BETTER_AUTH_SECRET: betterAuthSecret, RUST_LOG: "info" };
}

function logTail(): string {
  try {
    return readFileSync(engineLog, "utf8").split("\n").slice(-60).join("\n");
  } catch {
    return "(no engine log)";
  }
}

before(async () => {
  const bin = engineBinary();
  nc = await connect({ servers: NATS_URL, timeout: 3000 });
  appsNats = await Relay.start(Number(new URL(NATS_URL).port || 4222));
  const servers = appsNats.url("nats");
  ba = await betterAuthApp({ subjectPrefix: prefix, secret: betterAuthSecret, servers, logger: baLogger });
  pl = await payloadApp({ subjectPrefix: prefix, secret: payloadSecret, servers, logger: plLogger });
  const baUrl = await ba.listen();
  const plUrl = await pl.listen();
  baDb = new Database(join(ba.dir, "auth.db"));
  plDb = new Database(join(pl.dir, "payload.db"));
  for (const db of [baDb, plDb]) db.exec("PRAGMA busy_timeout = 5000");
  httpPort = await freePort();
  // The shape of tests/src/env.rs.
  writeFileSync(
    configPath,
    `
[engine]
shutdown_grace = "5s"
clock_skew = "500ms"
[nats]
url = "${NATS_URL}"
stream = "${stream}"
better_auth_subjects = ["${prefix}.user.>"]
payload_subjects = ["${prefix}.payload.user.>"]
durable_prefix = "${prefix}"
ack_wait = "5s"
[dedup]
backend = "memory"
key_prefix = "${prefix}:done"
[store]
url = "sqlite://${dir.path}/sync.db"
[targets.payload]
url = "${plUrl}/api/sync/webhook"
secret_env = "TEST_PAYLOAD_SECRET"
timeout = "5s"
[targets.payload.retry]
initial = "50ms"
max = "1s"
max_attempts = 8
[targets.better_auth]
url = "${baUrl}/api/auth/sync/webhook"
secret_env = "TEST_BETTER_AUTH_SECRET"
timeout = "5s"
[targets.better_auth.retry]
initial = "50ms"
max = "1s"
max_attempts = 8
[http]
listen = "127.0.0.1:${httpPort}"
[log]
level = "info"
`,
  );
  const log = openSync(engineLog, "a");
  engine = spawn(bin, ["run", "--config", configPath], { env: engineEnv(), stdio: ["ignore", log, log] });
  engine.on("exit", (code, signal) => (engineExit = `exit code ${code}, signal ${signal}`));
  await eventually(
    "the engine's /readyz",
    async () => {
      if (engineExit) throw new Error(`engine exited during startup (${engineExit}):\n${logTail()}`);
      const response = await fetch(`http://127.0.0.1:${httpPort}/readyz`).catch(() => undefined);
      return response?.status === 200;
    },
    30_000,
  );
});

after(async () => {
  if (engine && !engineExit) {
    engine.kill("SIGTERM");
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      new Promise((resolve) => engine!.once("exit", resolve)),
      new Promise((resolve) => (timer = setTimeout(resolve, 10_000))),
    ]);
    clearTimeout(timer);
    if (!engineExit) engine.kill("SIGKILL");
  }
  baDb?.close();
  plDb?.close();
  await ba?.close();
  await pl?.close();
  await appsNats?.close();
  if (nc) {
    const jsm = await nc.jetstreamManager();
    for (const name of streams) await jsm.streams.delete(name).catch(() => undefined);
    await nc.close();
  }
  if (process.exitCode) console.error(`engine log (${engineLog}):\n${logTail()}`);
  else dir.remove();
});

/** The engine's `sync_engine_*_total` counters (deliveries, retries, acks, …). */
async function engineCounters(): Promise<Record<string, number>> {
  const text = await (await fetch(`http://127.0.0.1:${httpPort}/metrics`)).text();
  const counters: Record<string, number> = {};
  for (const line of text.split("\n")) {
    const match = /^(sync_engine_\S+_total)\s+(\S+)$/.exec(line);
    if (match) counters[match[1]] = Number(match[2]);
  }
  assert.ok(Object.keys(counters).length > 0, `no counters in /metrics:\n${text}`);
  return counters;
}

/** Events in both of the engine's streams (one per application). */
async function streamCount(): Promise<number> {
  const jsm = await nc.jetstreamManager();
  let total = 0;
  for (const name of streams) total += (await jsm.streams.info(name)).state.messages;
  return total;
}

/** Both sides' users, as [id, email, name], sorted. */
async function sides() {
  const baUsers = (await ba.listUsers()).map((u) => [u.id, u.email, u.name]);
  const plUsers = (await pl.listUsers())
    .filter((u) => u.betterAuthUserId)
    .map((u) => [u.betterAuthUserId, u.email, u.fullName ?? ""]);
  const sort = (rows: unknown[][]) => rows.sort((a, b) => String(a[0]).localeCompare(String(b[0])));
  return { ba: sort(baUsers), pl: sort(plUsers) };
}

/** Rows sorted by id, the way `sides()` returns them. */
const byId = (rows: unknown[][]) => rows.sort((a, b) => String(a[0]).localeCompare(String(b[0])));

/**
 * Waits until both sides hold exactly `expected`. Agreement alone is not enough: while a
 * delivery is on its way both sides can briefly hold the same older state (one side applied
 * the other's stale copy and the engine's resend has not landed yet).
 */
async function converge(what: string, expected: unknown[][], timeoutMs = 20_000) {
  let last: Awaited<ReturnType<typeof sides>> | undefined;
  try {
    await eventually(
      what,
      async () => {
        last = await sides();
        const same = JSON.stringify(last.ba) === JSON.stringify(last.pl);
        return same && JSON.stringify(last.ba) === JSON.stringify(byId(expected));
      },
      timeoutMs,
    );
  } catch (error) {
    throw new Error(`${(error as Error).message}\nBetter Auth: ${JSON.stringify(last?.ba)}\nPayload: ${JSON.stringify(last?.pl)}\nexpected: ${JSON.stringify(expected)}\nengine log:\n${logTail()}`);
  }
}

test("both apps converge through the engine, and the traffic stops", async (t) => {
  // Sign-ups in Better Auth reach Payload.
  const ada = await ba.signUp("ada@example.com", "Ada Lovelace");
  const grace = await ba.signUp("grace@example.com", "Grace Hopper");
  const linus = await ba.signUp("linus@example.com", "Linus Torvalds");
  await converge("sign-ups to reach Payload", [
    [ada.user.id, "ada@example.com", "Ada Lovelace"],
    [grace.user.id, "grace@example.com", "Grace Hopper"],
    [linus.user.id, "linus@example.com", "Linus Torvalds"],
  ]);

  // An edit in Better Auth reaches Payload; an edit in Payload reaches Better Auth.
  await ba.auth.api.updateUser({ body: { name: "Ada King" }, headers: ada.headers });
  const graceDoc = (await pl.findByAuthId(grace.user.id))!;
  await pl.payload.update({ collection: "users", id: graceDoc.id, data: { fullName: "Rear Admiral Hopper" } });
  await converge("edits on each side to cross over", [
    [ada.user.id, "ada@example.com", "Ada King"],
    [grace.user.id, "grace@example.com", "Rear Admiral Hopper"],
    [linus.user.id, "linus@example.com", "Linus Torvalds"],
  ]);
  assert.equal((await ba.findUser(grace.user.id))?.name, "Rear Admiral Hopper");
  assert.equal((await pl.findByAuthId(ada.user.id))?.fullName, "Ada King");

  // Concurrent edits of different fields of one user on both sides both survive.
  const linusDoc = (await pl.findByAuthId(linus.user.id))!;
  await Promise.all([
    ba.auth.api.updateUser({ body: { name: "Linus B. Torvalds" }, headers: linus.headers }),
    pl.payload.update({ collection: "users", id: linusDoc.id, data: { email: "linus@kernel.org" } }),
  ]);
  await converge("concurrent edits to merge", [
    [ada.user.id, "ada@example.com", "Ada King"],
    [grace.user.id, "grace@example.com", "Rear Admiral Hopper"],
    [linus.user.id, "linus@kernel.org", "Linus B. Torvalds"],
  ]);
  assert.deepEqual(
    [(await ba.findUser(linus.user.id))?.email, (await ba.findUser(linus.user.id))?.name],
    ["linus@kernel.org", "Linus B. Torvalds"],
  );

  // A user created in Payload with a Better Auth id that Better Auth lacks is created there.
  await pl.payload.create({ collection: "users", data: { email: "cms@example.com", fullName: "Made In CMS", betterAuthUserId: `cms_${id}` } });
  await converge("a Payload-made user to reach Better Auth", [
    [ada.user.id, "ada@example.com", "Ada King"],
    [grace.user.id, "grace@example.com", "Rear Admiral Hopper"],
    [linus.user.id, "linus@kernel.org", "Linus B. Torvalds"],
    [`cms_${id}`, "cms@example.com", "Made In CMS"],
  ]);
  assert.equal((await ba.findUser(`cms_${id}`))?.email, "cms@example.com");

  // Deletions on either side.
  await ba.auth.api.deleteUser({ body: { password: ada.password }, headers: ada.headers });
  await pl.payload.delete({ collection: "users", id: (await pl.findByAuthId(grace.user.id))!.id });
  await converge("deletions to cross over", [
    [linus.user.id, "linus@kernel.org", "Linus B. Torvalds"],
    [`cms_${id}`, "cms@example.com", "Made In CMS"],
  ]);
  const final = await sides();
  assert.deepEqual(final.ba.map((row) => row[0]).sort(), [linus.user.id, `cms_${id}`].sort());
  assert.equal(await ba.findUser(ada.user.id), null);
  assert.equal(await pl.findByAuthId(ada.user.id), null);
  assert.equal(await ba.findUser(grace.user.id), null);

  // The traffic stops: no new event and no engine counter moving for 3 s, nothing dead-lettered.
  const quiet = async () => ({
    events: await streamCount(),
    published: ba.plugin.stats.published + pl.plugin.stats.published,
    engineCounters: await engineCounters(),
  });
  const settledAt = await quiet();
  t.diagnostic(`settled: ${JSON.stringify(settledAt)}`);
  await sleep(3000);
  assert.deepEqual(await quiet(), settledAt, "events kept flowing after convergence (a loop)");
  assert.equal(ba.plugin.stats.failed + pl.plugin.stats.failed, 0, JSON.stringify([baLogger.lines, plLogger.lines]));
  // 10 local changes (3 sign-ups, 4 edits, 1 create, 2 deletes) are 10 events: no write the
  // receivers made was published again.
  assert.equal(settledAt.events, 10, "events in the stream");
  assert.equal(settledAt.published, 10, "events the plugins published");
  const dlq = spawnSync(engineBinary(), ["dlq", "list", "--json", "--config", configPath], { env: engineEnv(), encoding: "utf8" });
  assert.equal(dlq.status, 0, dlq.stderr);
  assert.equal(dlq.stdout.trim(), "", `dead letters:\n${dlq.stdout}`);
  assert.deepEqual(await sides(), final, "state changed after the traffic stopped");
});

test("changes made while the apps cannot reach NATS all reach the other app once it is back", async (t) => {
  const before = (await sides()).ba;
  const n = 200;
  appsNats.cut();
  const expected: unknown[][] = [...before];
  let slowest = 0;
  for (let i = 0; i < n; i++) {
    let started = performance.now();
    const user = await ba.context.internalAdapter.createUser(
      { email: `cut-ba-${i}@example.com`, name: `Cut BA ${i}`, emailVerified: false },
      { method: "test" },
    );
    slowest = Math.max(slowest, performance.now() - started);
    expected.push([user.id, `cut-ba-${i}@example.com`, `Cut BA ${i}`]);
    started = performance.now();
    await pl.payload.create({
      collection: "users",
      data: { email: `cut-pl-${i}@example.com`, fullName: `Cut PL ${i}`, betterAuthUserId: `cutpl_${id}_${i}` },
    });
    slowest = Math.max(slowest, performance.now() - started);
    expected.push([`cutpl_${id}_${i}`, `cut-pl-${i}@example.com`, `Cut PL ${i}`]);
  }
  const waiting = [(await ba.plugin.outbox()).pending, (await pl.plugin.outbox()).pending];
  assert.deepEqual(waiting, [n, n], "every write succeeded and its event waits in its app's outbox");
  await sleep(1000);
  appsNats.restore();
  const restored = performance.now();
  await converge(`the ${2 * n} changes made during the cut to reach the other app`, expected, 60_000);
  t.diagnostic(
    `${2 * n} writes while the apps' NATS was cut (slowest ${slowest.toFixed(1)} ms); ` +
      `both apps agree ${(performance.now() - restored).toFixed(0)} ms after the restore`,
  );
  assert.deepEqual([(await ba.plugin.outbox()).pending, (await pl.plugin.outbox()).pending], [0, 0]);
});

/** Runs `sync-engine reconcile` over both apps' SQLite databases; its exit code and JSON report. */
async function reconcile(...extra: string[]): Promise<{ status: number | null; report: Record<string, any>; stderr: string }> {
  const args = ["reconcile", "--config", configPath, "--better-auth", `sqlite://${ba.dir}/auth.db`, "--payload", `sqlite://${pl.dir}/payload.db`, "--json", ...extra];
  const child = spawn(engineBinary(), args, { env: engineEnv() });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (chunk) => (stdout += chunk));
  child.stderr.on("data", (chunk) => (stderr += chunk));
  const status = await new Promise<number | null>((resolve) => child.on("close", resolve));
  let report: Record<string, any>;
  try {
    report = JSON.parse(stdout);
  } catch {
    throw new Error(`reconcile printed no JSON report (exit ${status}):\n${stdout}\n${stderr}`);
  }
  return { status, report, stderr };
}

test("reconcile --fix repairs every kind of drift planted in the apps' databases", async (t) => {
  const edited = await ba.signUp("edited@example.com", "Edited");
  const lost = await ba.signUp("lost@example.com", "Lost");
  const orphan = await ba.signUp("orphan@example.com", "Orphan");
  const byHand = await ba.signUp("byhand@example.com", "By Hand");
  const restored = await ba.signUp("restored@example.com", "Restored");
  const everyone = (await sides()).ba;
  await converge("the drift test's users to reach Payload", everyone, 60_000);
  const restoredRow = plDb.prepare("SELECT * FROM users WHERE better_auth_user_id = ?").get(restored.user.id) as Record<string, unknown>;
  await ba.auth.api.deleteUser({ body: { password: restored.password }, headers: restored.headers });
  const withoutRestored = everyone.filter((r) => r[0] !== restored.user.id);
  await converge("a deletion to reach Payload", withoutRestored);

  // The drift, planted in SQL behind both apps and the engine:
  // a Payload row edited, one deleted, and a deleted user's row restored;
  plDb.prepare("UPDATE users SET full_name = 'Edited Behind' WHERE better_auth_user_id = ?").run(edited.user.id);
  plDb.prepare("DELETE FROM users WHERE better_auth_user_id = ?").run(lost.user.id);
  const columns = Object.keys(restoredRow);
  plDb
    .prepare(`INSERT INTO users (${columns.map((c) => `"${c}"`).join(", ")}) VALUES (${columns.map(() => "?").join(", ")})`)
    .run(...columns.map((c) => restoredRow[c]));
  // a Better Auth user renamed, and one deleted (its Payload row is left over).
  const updatedAt = baDb.prepare('SELECT "updatedAt" FROM "user" WHERE id = ?').get(byHand.user.id) as { updatedAt: unknown };
  const later = typeof updatedAt.updatedAt === "number" ? Date.now() : new Date().toISOString();
  baDb.prepare('UPDATE "user" SET name = ?, "updatedAt" = ? WHERE id = ?').run("Renamed By Hand", later, byHand.user.id);
  for (const table of ["session", "account"]) baDb.prepare(`DELETE FROM "${table}" WHERE "userId" = ?`).run(orphan.user.id);
  baDb.prepare('DELETE FROM "user" WHERE id = ?').run(orphan.user.id);

  const found = await reconcile();
  assert.equal(found.status, 1, JSON.stringify(found.report));
  const ids = (entries: Record<string, string>[], field: string) => entries.map((e) => e[field]).sort();
  assert.deepEqual(ids(found.report.missing, "id"), [lost.user.id]);
  assert.deepEqual(ids(found.report.differing, "id"), [byHand.user.id, edited.user.id].sort());
  assert.deepEqual(ids(found.report.extra, "better_auth_user_id"), [orphan.user.id, restored.user.id].sort());

  const fixed = await reconcile("--fix");
  assert.equal(fixed.status, 1, fixed.stderr);
  assert.equal(fixed.report.fixes.length, 5, JSON.stringify(fixed.report));
  assert.deepEqual(fixed.report.not_fixed, []);
  const started = performance.now();
  const expected = withoutRestored
    .filter((r) => r[0] !== orphan.user.id)
    .map((r) => (r[0] === byHand.user.id ? [r[0], r[1], "Renamed By Hand"] : r));
  await converge("every drift to be repaired", expected, 60_000);
  t.diagnostic(`5 drifts repaired ${(performance.now() - started).toFixed(0)} ms after reconcile --fix`);
  assert.equal((await pl.findByAuthId(edited.user.id))?.fullName, "Edited", "the row edited behind the engine's back is Better Auth's again");
  assert.equal((await pl.findByAuthId(lost.user.id))?.email, "lost@example.com", "the lost row is back");

  const again = await reconcile();
  assert.equal(again.status, 0, JSON.stringify(again.report));
  assert.equal(again.report.in_sync, true);
});
