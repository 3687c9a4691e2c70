import { fork, type ChildProcess } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { installTrace } from './trace.ts'

/**
 * Bench child processes (servers and load clients), driven over IPC with request/response
 * messages. Every child dies with its parent (IPC disconnect), and the parent kills every
 * child it started on exit, on SIGINT/SIGTERM and on errors.
 */

type Handler = (args: any) => unknown
export type Handlers = Record<string, Handler>

interface Request { id: number, cmd: string, args: unknown }
type Response = { id: number, ok: true, result: unknown } | { id: number, ok: false, error: string }
interface Ready { ready: true, info: unknown }

// ---------------------------------------------------------------- child side

/** Runs in a child: answers the parent's calls with `handlers`, after announcing `info`. */
export function serveParent (handlers: Handlers, info: unknown = {}): void {
  if (!process.send) throw new Error('bench child started without an IPC channel')
  installTrace(handlers)
  // The parent is gone (crashed or killed): nothing will stop us otherwise.
  process.on('disconnect', () => process.exit(0))
  process.on('message', (message: Request) => {
    const handler = handlers[message.cmd]
    const reply = (response: Response) => { if (process.connected) process.send!(response) }
    if (!handler) return reply({ id: message.id, ok: false, error: `unknown command ${message.cmd}` })
    Promise.resolve().then(() => handler(message.args)).then(
      result => reply({ id: message.id, ok: true, result: result ?? null }),
      (err: unknown) => reply({ id: message.id, ok: false, error: err instanceof Error ? err.stack ?? err.message : String(err) })
    )
  })
  process.send({ ready: true, info } satisfies Ready)
}

/** Options a child reads from its argv (one JSON argument). */
export function childArgs<T> (): T {
  const raw = process.argv[2]
  return (raw ? JSON.parse(raw) : {}) as T
}

// ---------------------------------------------------------------- parent side

const live = new Set<Child>()

export interface StartOptions {
  /** Shown in errors. */
  name: string
  /** JSON-serialisable options, passed as the child's argv[2]. */
  args?: unknown
  /** Extra node flags (e.g. --cpu-prof). */
  execArgv?: string[]
  readyTimeoutMs?: number
}

export class Child {
  private nextId = 1
  private pending = new Map<number, { resolve: (v: any) => void, reject: (e: Error) => void, timer: NodeJS.Timeout }>()
  readonly exited: Promise<number | null>
  private exitCode: number | null | undefined

  private constructor (readonly name: string, readonly process: ChildProcess) {
    live.add(this)
    this.exited = new Promise(resolve => {
      process.once('exit', (code, signal) => {
        live.delete(this)
        this.exitCode = code
        for (const [, call] of this.pending) {
          clearTimeout(call.timer)
          call.reject(new Error(`${name} exited (code ${code}, signal ${signal})`))
        }
        this.pending.clear()
        resolve(code)
      })
    })
    process.on('message', (message: Response | Ready) => {
      if ('ready' in message) return
      const call = this.pending.get(message.id)
      if (!call) return
      this.pending.delete(message.id)
      clearTimeout(call.timer)
      if (message.ok) call.resolve(message.result)
      else call.reject(new Error(`${name}: ${message.error}`))
    })
  }

  get pid (): number { return this.process.pid ?? -1 }

  /** Forks `file` (a .ts module under bench/) through tsx and waits for its ready message. */
  static async start<Info = unknown> (file: string | URL, options: StartOptions): Promise<{ child: Child, info: Info }> {
    const path = file instanceof URL ? fileURLToPath(file) : file
    const proc = fork(path, [JSON.stringify(options.args ?? {})], {
      execArgv: ['--import', 'tsx', '--expose-gc', ...(options.execArgv ?? [])],
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
      serialization: 'advanced'
    })
    const child = new Child(options.name, proc)
    const timeoutMs = options.readyTimeoutMs ?? 120_000
    const info = await new Promise<Info>((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill()
        reject(new Error(`${options.name} not ready within ${timeoutMs} ms`))
      }, timeoutMs)
      proc.on('message', (message: Ready | Response) => {
        if ('ready' in message) {
          clearTimeout(timer)
          resolve(message.info as Info)
        }
      })
      proc.once('exit', (code) => {
        clearTimeout(timer)
        reject(new Error(`${options.name} exited before it was ready (code ${code})`))
      })
    })
    return { child, info }
  }

  call<T = any> (cmd: string, args: unknown = {}, timeoutMs = 120_000): Promise<T> {
    if (this.exitCode !== undefined || !this.process.connected) return Promise.reject(new Error(`${this.name} is not running`))
    const id = this.nextId++
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id)
        reject(new Error(`${this.name}: ${cmd} took longer than ${timeoutMs} ms`))
      }, timeoutMs)
      this.pending.set(id, { resolve, reject, timer })
      this.process.send({ id, cmd, args } satisfies Request)
    })
  }

  /** Asks the child to close (so --cpu-prof profiles are written), then kills it after `graceMs`. */
  async stop (graceMs = 10_000): Promise<void> {
    if (this.exitCode !== undefined) return
    // Already killed (the hard stop): its IPC channel is gone, a send would throw EPIPE.
    if (this.process.killed) { await this.exited; return }
    this.call('close', {}, graceMs).catch(() => {})
    const timer = setTimeout(() => this.kill(), graceMs)
    await this.exited
    clearTimeout(timer)
  }

  kill (): void {
    if (this.exitCode === undefined) this.process.kill('SIGKILL')
  }
}

/** Kills every child still running (synchronous: usable from an 'exit' handler). */
export function killAllChildren (): void {
  for (const child of live) child.kill()
}

/** Stops every child still running, gracefully first. */
export async function stopAllChildren (graceMs = 5000): Promise<void> {
  await Promise.all([...live].map(child => child.stop(graceMs)))
}
