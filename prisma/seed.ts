import type { PrismaClient } from '../src/generated/prisma/client.ts'
import { hashPassword, verifyPassword } from '../src/passwords.ts'

export const DEMO_PASSWORD = 'demo-password'

export const DEMO_USERS = [
  { email: 'admin@acme.test', name: 'Ada Admin', company: 'Acme Construction', role: 'admin' },
  { email: 'manager@acme.test', name: 'Max Manager', company: 'Acme Construction', role: 'manager' },
  { email: 'member@acme.test', name: 'Mia Member', company: 'Acme Construction', role: 'member' },
  { email: 'admin@globex.test', name: 'Gus Admin', company: 'Globex Builders', role: 'admin' },
  { email: 'member@globex.test', name: 'Gil Member', company: 'Globex Builders', role: 'member' }
] as const

// Transaction-level advisory lock the seed takes, so nodes starting together on a fresh database
// seed one after the other (the migration runner's lock is 72707369).
export const SEED_LOCK_ID = 72707370

/**
 * Seeds two demo companies with users, projects and stock, once: a database that already has
 * a company or a user is left alone (a users-only database was seeded beside its users, or
 * failed on a demo email already taken). Returns whether it seeded. Safe for concurrent callers (several nodes
 * starting on one fresh database): the emptiness check is repeated inside the seed transaction
 * under an advisory lock, so exactly one seeds and the others return false.
 */
const hasData = async (client: Pick<PrismaClient, 'company' | 'user'>) =>
  await client.company.count() > 0 || await client.user.count() > 0

export async function seedIfEmpty (prisma: PrismaClient): Promise<boolean> {
  // Cheap check first: a seeded database costs no password hashing and no lock.
  if (await hasData(prisma)) return false
  const hashes = await Promise.all(DEMO_USERS.map(() => hashPassword(DEMO_PASSWORD)))
  // The timeout covers waiting for the lock while another node seeds.
  return await prisma.$transaction(async (tx) => {
    await tx.$executeRawUnsafe(`SELECT pg_advisory_xact_lock(${SEED_LOCK_ID})`)
    // Read after the lock: another node may have seeded since the check above (READ COMMITTED
    // takes a new snapshot per statement, so its committed rows are visible here).
    if (await hasData(tx)) return false
    const companies = new Map<string, string>()
    for (const name of new Set(DEMO_USERS.map(u => u.company))) {
      companies.set(name, (await tx.company.create({ data: { name } })).id)
    }
    for (const [i, user] of DEMO_USERS.entries()) {
      await tx.user.create({
        data: {
          email: user.email,
          name: user.name,
          passwordHash: hashes[i]!,
          memberships: { create: { companyId: companies.get(user.company)!, role: user.role } }
        }
      })
    }
    const acme = companies.get('Acme Construction')!
    const globex = companies.get('Globex Builders')!
    for (const [companyId, names] of [[acme, ['Harbour Bridge Refit', 'Riverside Offices']], [globex, ['North Depot']]] as const) {
      for (const name of names) {
        const project = await tx.project.create({ data: { companyId, name, budgetMinor: 50_000_00 } })
        await tx.revision.create({ data: { entity: 'project', entityId: project.id, version: 1, companyId, data: JSON.parse(JSON.stringify(project)) } })
      }
    }
    for (const [companyId, sku, name, quantity, reorderLevel] of [
      [acme, 'CEM-25', 'Cement 25 kg', 120, 20],
      [acme, 'REB-12', 'Rebar 12 mm', 400, 50],
      [globex, 'PLY-18', 'Plywood 18 mm', 60, 10]
    ] as const) {
      const item = await tx.stockItem.create({ data: { companyId, sku, name, quantity, reorderLevel } })
      await tx.revision.create({ data: { entity: 'stockItem', entityId: item.id, version: 1, companyId, data: JSON.parse(JSON.stringify(item)) } })
    }
    return true
  }, { maxWait: 10_000, timeout: 60_000 })
}

/** The demo users present in the database whose password is still the published one. */
export async function demoLogins (prisma: PrismaClient): Promise<Array<(typeof DEMO_USERS)[number]>> {
  const users = await prisma.user.findMany({ where: { email: { in: DEMO_USERS.map(u => u.email) } }, select: { email: true, passwordHash: true } })
  const usable = new Set<string>()
  await Promise.all(users.map(async (user) => {
    if (await verifyPassword(DEMO_PASSWORD, user.passwordHash).catch(() => false)) usable.add(user.email)
  }))
  return DEMO_USERS.filter(u => usable.has(u.email))
}

/**
 * What `npm start` does about demo data: seeds an empty database when `seedDemo` says so
 * (SEED_DEMO; by default outside production only), then reports which demo logins work.
 */
export async function seedOnStart (prisma: PrismaClient, config: { seedDemo: boolean }): Promise<{ seeded: boolean, logins: Array<(typeof DEMO_USERS)[number]> }> {
  const seeded = config.seedDemo ? await seedIfEmpty(prisma) : false
  return { seeded, logins: await demoLogins(prisma) }
}
