import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import os from 'node:os'
import pg from 'pg'
import { BENCH_POSTGRES_URL } from './db.ts'

const ROOT = new URL('../../', import.meta.url)
const PACKAGES = ['fastify', 'socket.io', 'socket.io-client', 'engine.io', 'ws', 'prisma', '@prisma/client', '@prisma/adapter-pg', 'pg', 'tsx']

function version (name: string): string | null {
  try {
    return JSON.parse(readFileSync(new URL(`node_modules/${name}/package.json`, ROOT), 'utf8')).version
  } catch {
    return null
  }
}

/** The open-files limit of this shell (each socket is a file descriptor on both sides). */
export function openFilesLimit (): number | null {
  try {
    const out = execFileSync('sh', ['-c', 'ulimit -n'], { encoding: 'utf8' }).trim()
    return out === 'unlimited' ? Infinity : Number(out)
  } catch {
    return null
  }
}

export async function machine () {
  const cpus = os.cpus()
  let postgres: string | null = null
  try {
    const client = new pg.Client({ connectionString: BENCH_POSTGRES_URL })
    await client.connect()
    postgres = (await client.query<{ server_version: string }>('SHOW server_version')).rows[0]?.server_version ?? null
    await client.end()
  } catch {}
  return {
    machine: {
      platform: os.platform(),
      release: os.release(),
      arch: os.arch(),
      cpuModel: cpus[0]?.model ?? 'unknown',
      cpuCount: cpus.length,
      availableParallelism: os.availableParallelism(),
      totalMemoryBytes: os.totalmem(),
      loadAverage: os.loadavg(),
      openFilesLimit: openFilesLimit(),
      node: process.version
    },
    versions: { ...Object.fromEntries(PACKAGES.map(p => [p, version(p)])), postgres }
  }
}

/** The machine's CPU time so far, all cores (ms): busy (user, nice, sys, irq) and total. */
export function cpuTimes (): { busy: number, total: number } {
  let busy = 0
  let total = 0
  for (const { times } of os.cpus()) {
    const all = times.user + times.nice + times.sys + times.irq + times.idle
    total += all
    busy += all - times.idle
  }
  return { busy, total }
}

/** The share of the machine's CPU (0..1, all cores) that was busy between two `cpuTimes()`. */
export const busyBetween = (before: { busy: number, total: number }, after: { busy: number, total: number }): number =>
  after.total > before.total ? (after.busy - before.busy) / (after.total - before.total) : NaN
