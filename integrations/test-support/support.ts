// Test helpers shared by the integration packages' tests (not published).
import assert from "node:assert/strict";
import { randomBytes, randomUUID } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before } from "node:test";
import { connect, type NatsConnection, type StoredMsg } from "nats";
import { Webhook } from "standardwebhooks";

export const NATS_URL = process.env.NATS_URL ?? "nats://127.0.0.1:4222";

/** Event ids (PROTOCOL.md §1): 1–128 of A-Za-z0-9_:-. */
export const EVENT_ID = /^[A-Za-z0-9_:-]{1,128}$/;

export function newSecret(): string {
  return `whsec_${randomBytes(32).toString("base64")}`;
}

export function tempDir(name: string): { path: string; remove(): void } {
  const path = mkdtempSync(join(tmpdir(), `${name}-`));
  return { path, remove: () => rmSync(path, { recursive: true, force: true }) };
}

export interface Published {
  subject: string;
  msgId: string | undefined;
  envelope: { id: string; origin: string; type: string; timestamp: number; data: Record<string, any> };
}

/** A JetStream stream T_<id> capturing t<id>.user.> and t<id>.payload.user.>, like the Rust tests. */
export class TestStream {
  readonly id = randomUUID().replace(/-/g, "").slice(0, 12);
  readonly name = `T_${this.id}`;
  /** The subjectPrefix option value for the plugins. */
  readonly prefix = `t${this.id}`;
  private constructor(readonly nc: NatsConnection) {}

  static async create(): Promise<TestStream> {
    let nc: NatsConnection;
    try {
      nc = await connect({ servers: NATS_URL, timeout: 3000 });
    } catch (error) {
      throw new Error(`NATS with JetStream must run at ${NATS_URL} for these tests: ${String(error)}`);
    }
    const stream = new TestStream(nc);
    const jsm = await nc.jetstreamManager();
    await jsm.streams.add({
      name: stream.name,
      subjects: [`${stream.prefix}.user.>`, `${stream.prefix}.payload.user.>`],
      duplicate_window: 120 * 1_000_000_000,
    });
    return stream;
  }

  async count(): Promise<number> {
    const jsm = await this.nc.jetstreamManager();
    return (await jsm.streams.info(this.name)).state.messages;
  }

  /** All messages, oldest first. */
  async messages(): Promise<Published[]> {
    const jsm = await this.nc.jetstreamManager();
    const total = await this.count();
    const out: Published[] = [];
    for (let seq = 1; seq <= total; seq++) {
      const message: StoredMsg = await jsm.streams.getMessage(this.name, { seq });
      out.push({
        subject: message.subject,
        msgId: message.header?.get("Nats-Msg-Id") || undefined,
        envelope: JSON.parse(new TextDecoder().decode(message.data)),
      });
    }
    return out;
  }

  /** Waits until the stream holds at least `n` messages, then returns them all. */
  async waitFor(n: number, timeoutMs = 5000): Promise<Published[]> {
    const deadline = Date.now() + timeoutMs;
    while ((await this.count()) < n) {
      if (Date.now() > deadline) throw new Error(`stream ${this.name}: expected ${n} messages, have ${await this.count()}`);
      await sleep(20);
    }
    return this.messages();
  }

  async remove(): Promise<void> {
    try {
      const jsm = await this.nc.jetstreamManager();
      await jsm.streams.delete(this.name);
    } finally {
      await this.nc.close();
    }
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Headers and body of a delivery as the engine signs it (Standard Webhooks, PROTOCOL.md §3). */
export function signedDelivery(
  secret: string,
  envelope: { id: string; origin: string; type: string; timestamp: number; data: Record<string, unknown> },
  webhookId = envelope.id,
): Delivery {
  const body = JSON.stringify(envelope);
  const now = new Date();
  const signature = new Webhook(secret).sign(webhookId, now, body);
  return {
    body,
    headers: {
      "content-type": "application/json",
      "webhook-id": webhookId,
      "webhook-timestamp": String(Math.floor(now.getTime() / 1000)),
      "webhook-signature": signature,
      "x-webhook-id": webhookId,
      "x-webhook-timestamp": String(now.getTime()),
      "x-webhook-origin": envelope.origin,
      "x-webhook-event": envelope.type,
    },
  };
}

export type Delivery = { headers: Record<string, string>; body: string };

/** POSTs a delivery to a receiver endpoint; returns the status and the JSON body (null if none). */
export async function postDelivery(url: string, delivery: Delivery): Promise<{ status: number; body: any }> {
  const response = await fetch(url, { method: "POST", headers: delivery.headers, body: delivery.body });
  return { status: response.status, body: await response.json().catch(() => null) };
}

/**
 * For a describe(): before its tests, a TestStream and an app started with the stream's
 * subjectPrefix, a new secret and a recording logger, served over HTTP; after them, both removed.
 * `deliver` POSTs a delivery to the app's receiver at `webhookPath`.
 */
export function liveApp<App extends { listen(): Promise<string>; close(): Promise<void>; plugin: { drained(ms: number): Promise<boolean> } }>(
  start: (options: { subjectPrefix: string; secret: string; logger: ReturnType<typeof recordingLogger> }) => Promise<App>,
  webhookPath: string,
) {
  const live = {
    secret: newSecret(),
    logger: recordingLogger(),
    stream: undefined as unknown as TestStream,
    app: undefined as unknown as App,
    baseUrl: "",
    deliver: (delivery: Delivery) => postDelivery(`${live.baseUrl}${webhookPath}`, delivery),
    /** The stream's length once the app's outbox has published everything written so far. */
    published: async () => {
      assert.ok(await live.app.plugin.drained(5000), "the outbox drains");
      return live.stream.count();
    },
  };
  before(async () => {
    live.stream = await TestStream.create();
    live.app = await start({ subjectPrefix: live.stream.prefix, secret: live.secret, logger: live.logger });
    live.baseUrl = await live.app.listen();
  });
  after(async () => {
    await live.app?.close();
    await live.stream?.remove();
  });
  return live;
}

/**
 * Deliveries of `envelope` that a receiver must refuse with 401, by what is wrong with them:
 * signed with another secret, body changed after signing, no signature, a timestamp an hour old.
 */
export function badlySigned(secret: string, envelope: Parameters<typeof signedDelivery>[1]): Record<string, Delivery> {
  const tampered = signedDelivery(secret, envelope);
  tampered.body = tampered.body.replace(/}$/, ',"tampered":true}');
  const unsigned = signedDelivery(secret, envelope);
  delete unsigned.headers["webhook-signature"];
  const stale = signedDelivery(secret, envelope);
  stale.headers["webhook-timestamp"] = String(Math.floor(Date.now() / 1000) - 3600);
  return { "another secret": signedDelivery(newSecret(), envelope), tampered, unsigned, stale };
}

/** Serves a fetch-style handler on 127.0.0.1 at a random port. */
export async function serve(
  handler: (request: Request) => Promise<Response>,
): Promise<{ url: string; close(): Promise<void> }> {
  const server: Server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on("data", (chunk: Buffer) => chunks.push(chunk));
    req.on("end", async () => {
      try {
        const headers = new Headers();
        for (const [name, value] of Object.entries(req.headers)) {
          if (typeof value === "string") headers.set(name, value);
          else if (Array.isArray(value)) for (const v of value) headers.append(name, v);
        }
        const body = chunks.length ? Buffer.concat(chunks) : undefined;
        const request = new Request(`http://${req.headers.host}${req.url}`, {
          method: req.method,
          headers,
          body: req.method === "GET" || req.method === "HEAD" ? undefined : body,
        });
        const response = await handler(request);
        const responseHeaders: Record<string, string> = {};
        response.headers.forEach((value, name) => (responseHeaders[name] = value));
        res.writeHead(response.status, responseHeaders);
        res.end(Buffer.from(await response.arrayBuffer()));
      } catch (error) {
        res.writeHead(500, { "content-type": "text/plain" });
        res.end(String(error));
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** Polls `check` until it returns true. */
export async function eventually(what: string, check: () => Promise<boolean> | boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(50);
  }
}

/** A logger that keeps what it was told (and stays quiet). */
export function recordingLogger() {
  const lines: { level: string; message: string }[] = [];
  return {
    lines,
    /** The messages logged as errors. */
    errors: () => lines.filter((l) => l.level === "error").map((l) => l.message),
    info: (message: string) => void lines.push({ level: "info", message }),
    warn: (message: string) => void lines.push({ level: "warn", message }),
    error: (message: string) => void lines.push({ level: "error", message }),
  };
}

/** Runs `fn` with the environment variable `name` unset, then restores it. */
export function withoutEnv(name: string, fn: () => void): void {
  const saved = process.env[name];
  delete process.env[name];
  try {
    fn();
  } finally {
    if (saved !== undefined) process.env[name] = saved;
  }
}

/** The shared PostgreSQL (trust auth) that the tests create their own databases in. */
export const POSTGRES_ADMIN_URL = process.env.POSTGRES_URL ?? "postgres://postgres@127.0.0.1:5432/test";

/** A fresh PostgreSQL database of the test's own; `drop()` removes it. Fails loudly without PostgreSQL. */
export async function postgresDatabase(prefix: string): Promise<{ url: string; drop(): Promise<void> }> {
  const { default: pg } = await import("pg");
  const name = `${prefix}_${randomUUID().replace(/-/g, "").slice(0, 12)}`;
  const admin = new pg.Client({ connectionString: POSTGRES_ADMIN_URL });
  try {
    await admin.connect();
  } catch (error) {
    throw new Error(`PostgreSQL must run at ${POSTGRES_ADMIN_URL} for these tests: ${String(error)}`);
  }
  await admin.query(`CREATE DATABASE ${name}`);
  await admin.end();
  const url = new URL(POSTGRES_ADMIN_URL);
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    async drop() {
      const client = new pg.Client({ connectionString: POSTGRES_ADMIN_URL });
      await client.connect();
      await client.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      await client.end();
    },
  };
}
