// A headless Better Auth app (SQLite through libsql's better-sqlite3-compatible driver) with the
// sync-engine plugin, for tests.
import { betterAuth } from "better-auth";
import { getMigrations } from "better-auth/db/migration";
import { toNodeHandler } from "better-auth/node";
import { SqliteDialect } from "kysely";
import Database from "libsql";
import pg from "pg";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { syncEngine, type SyncEngineOptions } from "@sync-engine/better-auth";
import { tempDir } from "./support.ts";

/**
 * `dir`: the folder of an earlier app's database, to start that app again (it is then not
 * removed). `postgres`: a PostgreSQL database URL to use instead of SQLite.
 */
export async function betterAuthApp(options: SyncEngineOptions, { dir: reuse, postgres }: { dir?: string; postgres?: string } = {}) {
  const dir = reuse ? { path: reuse, remove() {} } : tempDir("better-auth");
  const database = postgres ? undefined : new Database(join(dir.path, "auth.db"));
  const pool = postgres ? new pg.Pool({ connectionString: postgres, max: 4 }) : undefined;
  const plugin = syncEngine(options);
  const auth = betterAuth({
    database: pool ?? { dialect: new SqliteDialect({ database: database as any }), type: "sqlite" },
    secret: "test-secret-0123456789-abcdefghijklmnop-XYZ",
    baseURL: "http://127.0.0.1",
    emailAndPassword: { enabled: true },
    user: { deleteUser: { enabled: true } },
    logger: { disabled: true },
    telemetry: { enabled: false },
    plugins: [plugin],
  });
  await (await getMigrations(auth.options)).runMigrations();
  const context = await auth.$context;
  let server: ReturnType<typeof createServer> | undefined;

  return {
    auth,
    plugin,
    context,
    dir: dir.path,
    /** Signs a user up through the API; returns the user and the session headers. */
    async signUp(email: string, name: string, password = "password-1234") {
      const { headers, response } = await auth.api.signUpEmail({
        body: { email, name, password },
        returnHeaders: true,
      });
      const cookie = headers.getSetCookie().map((c) => c.split(";")[0]).join("; ");
      return { user: response.user, headers: new Headers({ cookie }), password };
    },
    findUser: (id: string) => context.internalAdapter.findUserById(id),
    async listUsers() {
      const users = await context.adapter.findMany<Record<string, any>>({ model: "user", limit: 100_000 });
      return users.sort((a, b) => String(a.id).localeCompare(String(b.id)));
    },
    /** Serves auth.handler on 127.0.0.1; returns the base URL. */
    async listen(): Promise<string> {
      server = createServer(toNodeHandler(auth));
      await new Promise<void>((resolve) => server!.listen(0, "127.0.0.1", resolve));
      return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    },
    async close() {
      if (server) {
        server.closeAllConnections();
        await new Promise((resolve) => server!.close(resolve));
      }
      await plugin.close();
      database?.close();
      await pool?.end();
      dir.remove();
    },
    /** Closes the app but keeps its database, for `betterAuthApp(options, { dir })`. */
    async stop() {
      await plugin.close();
      database?.close();
      await pool?.end();
    },
  };
}
