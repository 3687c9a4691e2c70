import { mkdtemp, readFile, rm, utimes, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import t, { type Test } from 'tap'
import { openDatabase } from '../src/db/index.ts'

// Regression (database review): PGlite has no lock of its own. Two processes on one data
// directory (`npm run db:seed` while `npm start` runs) each wrote their own copy, and the last to
// close won: the other's rows were gone.

async function tempDir (t: Test): Promise<string> {
  const dir = await mkdtemp(path.join(tmpdir(), 'erp-pglite-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  return path.join(dir, 'pglite')
}

t.test('an embedded data directory is opened by one database at a time', async t => {
  const dir = await tempDir(t)
  const first = await openDatabase({ dataDir: dir })
  t.equal(await readFile(`${dir}.lock`, 'utf8'), String(process.pid), 'the lock names its process')
  await t.rejects(openDatabase({ dataDir: dir }), { message: `the embedded database in ${dir} is in use by process ${process.pid} (this one): stop it first (or give each its own DATA_DIR)` })
  await first.close()
  await t.rejects(readFile(`${dir}.lock`, 'utf8'), { code: 'ENOENT' }, 'close removes the lock')
  const second = await openDatabase({ dataDir: dir })
  t.teardown(() => second.close())
  t.equal(await second.prisma.company.count().catch(() => 'not migrated'), 'not migrated', 'it opens once the first one closed')
})

t.test('a lock left by a process that is gone is taken over', async t => {
  const dir = await tempDir(t)
  await writeFile(`${dir}.lock`, '2147483646') // no such process
  const db = await openDatabase({ dataDir: dir })
  t.teardown(() => db.close())
  t.equal(await readFile(`${dir}.lock`, 'utf8'), String(process.pid))
})

// Regression (review of the lock): a lock naming this process's own pid was refused as "in use
// (this one)", so a container restarted after a crash (same pid) never started again; and an
// empty lock (its owner between creating it and writing its pid) read as pid 0 and was taken.
t.test('a lock naming this process but not held by it is taken over; one without a pid only once it is old', async t => {
  const dir = await tempDir(t)
  await writeFile(`${dir}.lock`, String(process.pid))
  const db = await openDatabase({ dataDir: dir })
  t.equal(await readFile(`${dir}.lock`, 'utf8'), String(process.pid))
  await db.close()

  await writeFile(`${dir}.lock`, '')
  await t.rejects(openDatabase({ dataDir: dir }), { name: 'DatabaseInUseError', message: /is being created by another process/ }, 'a fresh lock without a pid')
  const old = new Date(Date.now() - 60_000)
  await utimes(`${dir}.lock`, old, old)
  const again = await openDatabase({ dataDir: dir })
  t.teardown(() => again.close())
  t.equal(await readFile(`${dir}.lock`, 'utf8'), String(process.pid), 'an old one is taken over')
})
