// A TCP relay in front of a real service, which a test cuts and restores (the TypeScript twin of
// tests/src/relay.rs): outages are simulated without touching the shared services.
import { createConnection, createServer, type Server, type Socket } from "node:net";
import type { AddressInfo } from "node:net";

export class Relay {
  private readonly sockets = new Set<Socket>();
  private cutOff = false;
  private constructor(
    private readonly server: Server,
    readonly port: number,
  ) {}

  /** Listens on 127.0.0.1 (a free port) and forwards every connection to `host:port`. */
  static async start(upstreamPort: number, upstreamHost = "127.0.0.1"): Promise<Relay> {
    let relay!: Relay;
    const server = createServer((inbound) => relay.serve(inbound, upstreamHost, upstreamPort));
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    relay = new Relay(server, (server.address() as AddressInfo).port);
    return relay;
  }

  /** `<scheme>://127.0.0.1:<port>`. */
  url(scheme: string): string {
    return `${scheme}://127.0.0.1:${this.port}`;
  }

  /** Closes every connection and refuses new ones (accepted and closed at once): a service that is down. */
  cut(): void {
    this.cutOff = true;
    for (const socket of this.sockets) socket.destroy();
    this.sockets.clear();
  }

  /** Forwards again. */
  restore(): void {
    this.cutOff = false;
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise((resolve) => this.server.close(resolve));
  }

  private serve(inbound: Socket, host: string, port: number): void {
    if (this.cutOff) {
      inbound.destroy();
      return;
    }
    const outbound = createConnection({ host, port });
    for (const [socket, other] of [
      [inbound, outbound],
      [outbound, inbound],
    ] as const) {
      this.sockets.add(socket);
      socket.setNoDelay(true);
      socket.on("error", () => other.destroy());
      socket.on("close", () => {
        this.sockets.delete(socket);
        other.destroy();
      });
      socket.pipe(other);
    }
  }
}
