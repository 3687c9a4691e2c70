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
