import { randomBytes, scrypt, timingSafeEqual, type ScryptOptions } from 'node:crypto'
import { Errors } from '../plugins/errors.ts'
import { Semaphore } from '../plugins/offline-queue/semaphore.ts'

// scrypt (a memory-hard KDF from node:crypto): N=2^15, r=8, p=1 takes ~50-100 ms per hash here.
const PARAMS = { N: 2 ** 15, r: 8, p: 1 }
const KEY_LENGTH = 32
// scrypt runs on libuv's thread pool (4 threads by default), which DNS lookups, file access and
// zlib share: a burst of logins may take two of them, never all.
const hashing = new Semaphore(2)
// Hashes running or waiting; past this many a login answers 503 at once instead of queueing
// behind a flood (from many addresses: each one is limited by the login rate limit).
const MAX_PENDING = 64
let pending = 0

function derive (password: string, salt: Buffer, params: typeof PARAMS): Promise<Buffer> {
  const options: ScryptOptions = { ...params, maxmem: 128 * params.N * params.r * 2 }
  if (pending >= MAX_PENDING) return Promise.reject(new Errors.SERVICE_UNAVAILABLE('Too many logins at once; retry'))
  pending++
  return hashing.run(() => new Promise<Buffer>((resolve, reject) => {
    scrypt(password.normalize('NFKC'), salt, KEY_LENGTH, options, (err, key) => (err ? reject(err) : resolve(key)))
  })).finally(() => { pending-- })
}

/** `scrypt$N$r$p$<salt b64>$<hash b64>` */
export async function hashPassword (password: string): Promise<string> {
  const salt = randomBytes(16)
  const key = await derive(password, salt, PARAMS)
  return ['scrypt', PARAMS.N, PARAMS.r, PARAMS.p, salt.toString('base64'), key.toString('base64')].join('$')
}

export async function verifyPassword (password: string, stored: string): Promise<boolean> {
  const [scheme, n, r, p, salt, hash] = stored.split('$')
  if (scheme !== 'scrypt' || !salt || !hash) return false
  const expected = Buffer.from(hash, 'base64')
  const key = await derive(password, Buffer.from(salt, 'base64'), { N: Number(n), r: Number(r), p: Number(p) })
  return key.length === expected.length && timingSafeEqual(key, expected)
}
