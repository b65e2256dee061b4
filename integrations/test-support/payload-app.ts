// A headless Payload app (SQLite, schema push) with the sync-engine plugin, for tests.
import { sqliteAdapter } from "@payloadcms/db-sqlite";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { buildConfig, getPayload, handleEndpoints } from "payload";
import { syncEnginePlugin, type PayloadSyncOptions } from "@sync-engine/payload";
import { serve, tempDir } from "./support.ts";

/**
 * `dir`: the folder of an earlier app's database, to start that app again (it is then not
 * removed). `transactions`: switch on the SQLite adapter's transactions (off by default).
 * A user created with `bio: "rollback"` fails in an `afterOperation` hook, after every
 * `afterChange` hook (the plugin's included) and before the commit.
 */
export async function payloadApp(
  options: PayloadSyncOptions,
  { authUsers = false, dir: reuse, transactions = false }: { authUsers?: boolean; dir?: string; transactions?: boolean } = {},
) {
  const dir = reuse ? { path: reuse, remove() {} } : tempDir("payload");
  // Payload skips the dev schema push when the schema equals the last one pushed in this
  // process: a second app with the same collections would find its new database empty.
  process.env.PAYLOAD_FORCE_DRIZZLE_PUSH = "true";
  const plugin = syncEnginePlugin(options);
  const key = `test-${randomUUID()}`;
  const config = await buildConfig({
    secret: "payload-test-secret-0123456789",
    db: sqliteAdapter({
      client: { url: `file:${join(dir.path, "payload.db")}` },
      push: true,
      ...(transactions ? { transactionOptions: {} } : {}),
    }),
    telemetry: false,
    typescript: { autoGenerate: false },
    admin: { user: "admins" },
    logger: { options: { level: "warn" } },
    collections: [
      { slug: "admins", auth: true, fields: [] },
      {
        slug: "users",
        auth: authUsers,
        hooks: {
          afterOperation: [
            ({ operation, result }) => {
              if (operation === "create" && (result as { bio?: string } | undefined)?.bio === "rollback") {
                throw new Error("a later hook failed");
              }
              return result;
            },
          ],
        },
        fields: [
          ...(authUsers ? [] : [{ name: "email", type: "email" as const, required: true }]),
          { name: "fullName", type: "text" },
          { name: "betterAuthUserId", type: "text", unique: true, index: true },
          { name: "bio", type: "text" },
        ],
      },
    ],
    plugins: [plugin],
  });
  const payload = await getPayload({ config, key });
  let server: Awaited<ReturnType<typeof serve>> | undefined;
  return {
    payload,
    plugin,
    config,
    dir: dir.path,
    async findByAuthId(id: string) {
      const found = await payload.find({ collection: "users", where: { betterAuthUserId: { equals: id } }, limit: 1, depth: 0 });
      return (found.docs[0] as Record<string, any> | undefined) ?? null;
    },
    async listUsers() {
      const found = await payload.find({ collection: "users", limit: 0, pagination: false, depth: 0, sort: "betterAuthUserId" });
      return found.docs as Record<string, any>[];
    },
    /** Serves Payload's REST API (handleEndpoints, its framework-agnostic adapter) on 127.0.0.1. */
    async listen(): Promise<string> {
      server = await serve((request) => handleEndpoints({ config, request, payloadInstanceCacheKey: key }));
      return server.url;
    },
    async close() {
      await server?.close();
      await plugin.close();
      await payload.destroy();
      dir.remove();
    },
    /** Closes the app but keeps its database, for `payloadApp(options, { dir })`. */
    async stop() {
      await server?.close();
      await plugin.close();
      await payload.destroy();
    },
  };
}
