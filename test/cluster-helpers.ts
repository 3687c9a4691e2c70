// Helpers for the multi-node tests: real `src/server.ts` processes, a dedicated redis-server,
// and a client that follows its streams by seq across reconnects.
import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { createServer } from 'node:net'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { io as ioClient, type Socket as ClientSocket } from 'socket.io-client'
import { dropRedisPrefix, TEST_JWT_SECRET, sleep, waitFor, type TestLike } from './helpers.ts'

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')

/** A TCP port nobody listens on right now. */
export async function freePort (): Promise<number> {
  const server = createServer()
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const address = server.address()
  const port = typeof address === 'object' && address ? address.port : 0
  await new Promise(resolve => server.close(resolve))
  return port
}

export interface DedicatedRedis {
  port: number
  url: string
  /** Starts (or restarts) redis-server on the same port; resolves once it answers. */
  start (): Promise<void>
  /** SIGKILLs the server (an outage, not a clean shutdown). */
  stop (): Promise<void>
  /** SIGSTOP / SIGCONT: a stalled server whose connections stay open. */
  pause (): Promise<void>
  resume (): Promise<void>
}

/**
 * A redis-server of the test's own on a free port (never the shared one): no persistence, so
 * a restart comes back empty like a crashed cache. Killed at teardown.
 */
export async function dedicatedRedis (t: TestLike, options: { password?: string, start?: boolean } = {}): Promise<DedicatedRedis> {
  const port = await freePort()
  let child: ChildProcess | undefined
  const auth = options.password ? `:${encodeURIComponent(options.password)}@` : ''
  const redis: DedicatedRedis = {
    port,
    url: `redis://${auth}127.0.0.1:${port}`,
    async start () {
      const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--daemonize', 'no']
      if (options.password) args.push('--requirepass', options.password)
      const started = spawn('redis-server', args, { stdio: ['ignore', 'pipe', 'pipe'] })
      child = started
      let output = ''
      started.stdout!.on('data', (chunk: Buffer) => { output += chunk.toString() })
      started.stderr!.on('data', (chunk: Buffer) => { output += chunk.toString() })
      await waitFor(() => output.includes('Ready to accept connections') || started.exitCode !== null, 10_000, `redis-server on ${port}`)
      if (started.exitCode !== null) throw new Error(`redis-server on ${port} exited: ${output}`)
    },
    async pause () {
      child?.kill('SIGSTOP')
    },
    async resume () {
      child?.kill('SIGCONT')
    },
    async stop () {
      const running = child
      child = undefined
      if (!running || running.exitCode !== null) return
      running.kill('SIGCONT')
      running.kill('SIGKILL')
      await once(running, 'exit')
    }
  }
  t.teardown(() => redis.stop())
  if (options.start !== false) await redis.start()
  return redis
}

export interface NodeProcess {
  url: string
  child: ChildProcess
  /** Everything the process wrote, for failure messages. */
  output (): string
  /** Whether it has exited (a crash, unless the test killed it). */
  exited (): boolean
  kill (signal?: NodeJS.Signals): Promise<void>
}

/**
 * Starts `src/server.ts` as a real process on port 0 with `env` (DATABASE_URL, REDIS_URL...),
 * resolving with its URL once the banner says it listens. Killed at teardown.
 */
export async function startNode (t: TestLike, env: Record<string, string>): Promise<NodeProcess> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/server.ts'], {
    cwd: root,
    // Coverage off in the child (tsx transform; see test/startup.test.ts).
    env: { ...process.env, PORT: '0', HOST: '127.0.0.1', JWT_SECRET: TEST_JWT_SECRET, LOG_LEVEL: 'warn', _TAPJS_PROCESSINFO_COVERAGE_: '0', ...env },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  let output = ''
  child.stdout!.on('data', (chunk: Buffer) => { output += chunk.toString() })
  child.stderr!.on('data', (chunk: Buffer) => { output += chunk.toString() })
  const node: NodeProcess = {
    url: '',
    child,
    output: () => output,
    exited: () => child.exitCode !== null || child.signalCode !== null,
    async kill (signal = 'SIGKILL') {
      if (node.exited()) return
      child.kill(signal)
      await once(child, 'exit')
    }
  }
  t.teardown(async () => {
    await node.kill()
    // Nodes killed without cleanup leave presence entries; no node of this prefix remains to
    // expire them, so remove them from the (possibly shared) Redis once this node is gone.
    if (env.REDIS_URL && env.REDIS_PREFIX) await dropRedisPrefix(env.REDIS_URL, env.REDIS_PREFIX)
  })
  await waitFor(() => /listening on (http:\/\/\S+)/.test(output) || node.exited(), 60_000, 'the node to listen')
  const match = /listening on (http:\/\/\S+)/.exec(output)
  if (!match) throw new Error(`node exited before listening:\n${output}`)
  node.url = match[1]!
  return node
}

/** POST /projects on `url` as `token`; returns the created project. */
export async function createProject (url: string, token: string, name: string): Promise<{ id: string }> {
  const response = await fetch(`${url}/projects`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ name })
  })
  if (response.status !== 201) throw new Error(`POST ${url}/projects answered ${response.status}: ${await response.text()}`)
  return (await response.json() as { project: { id: string } }).project
}

export async function health (url: string): Promise<{ statusCode: number, body: any }> {
  const response = await fetch(`${url}/health/websocket`)
  return { statusCode: response.status, body: await response.json() }
}

/**
 * A client that records, per stream, the seq of every domain event in arrival order (no
 * client-side dedupe, so the assertions see exactly what the server sent). `failover` makes
 * it behave like the reference client: when its node goes away it connects to the next URL
 * with `auth: { token, resume: true }` and sends `sync:resume` with its last seq per stream.
 */
export class Follower {
  socket!: ClientSocket
  readonly seqs = new Map<string, number[]>()
  /** Every domain event received, in arrival order. */
  readonly events: any[] = []
  readonly resumes: any[] = []
  reconnects = 0
  /** How long a failing-over client stays away before reconnecting (a mobile network blip). */
  reconnectDelayMs = 0
  private closed = false

  constructor (
    t: TestLike,
    readonly name: string,
    private readonly token: string,
    readonly streams: string[],
    private urls: string[],
    private readonly failover = false
  ) {
    for (const stream of streams) this.seqs.set(stream, [])
    t.teardown(() => this.close())
  }

  get url (): string {
    return this.urls[0]!
  }

  last (stream: string): number {
    const seen = this.seqs.get(stream) ?? []
    return seen.length === 0 ? 0 : Math.max(...seen)
  }

  async connect (resume = false): Promise<void> {
    const socket = ioClient(this.url, { transports: ['websocket'], reconnection: false, forceNew: true, auth: resume ? { token: this.token, resume: true } : { token: this.token } })
    this.socket = socket
    socket.onAny((event: string, payload: any) => {
      if (event === 'sync:head' || typeof payload?.seq !== 'number' || typeof payload?.stream !== 'string') return
      this.events.push(payload)
      const seen = this.seqs.get(payload.stream)
      if (seen) seen.push(payload.seq)
    })
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', () => resolve())
      socket.once('connect_error', reject)
    })
    if (!this.failover) return
    socket.once('disconnect', () => {
      if (this.closed) return
      // The node died: forget it and move to a surviving one.
      this.urls = [...this.urls.slice(1), this.urls[0]!]
      void this.reconnect()
    })
  }

  private async reconnect (): Promise<void> {
    await sleep(this.reconnectDelayMs)
    for (let attempt = 0; attempt < 50 && !this.closed; attempt++) {
      try {
        await this.connect(true)
        this.reconnects++
        await this.resume()
        return
      } catch {
        this.urls = [...this.urls.slice(1), this.urls[0]!]
        await sleep(100)
      }
    }
  }

  /** `sync:resume` from the last seq seen on every stream; resolves the ack. */
  async resume (): Promise<any> {
    const streams = Object.fromEntries(this.streams.map(stream => [stream, this.last(stream)]))
    const ack = await this.socket.timeout(15_000).emitWithAck('sync:resume', { streams })
    this.resumes.push(ack)
    if (!ack.ok) throw new Error(`${this.name}: sync:resume failed: ${JSON.stringify(ack)}`)
    return ack
  }

  close (): void {
    this.closed = true
    this.socket?.disconnect()
  }
}

/** [1, 2, ..., n] */
export const range = (n: number) => Array.from({ length: n }, (_, i) => i + 1)
