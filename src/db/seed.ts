import type { PrismaClient } from '../generated/prisma/client.ts'
import { hashPassword } from '../passwords.ts'

export const DEMO_PASSWORD = 'demo-password'

export const DEMO_USERS = [
  { email: 'admin@acme.test', name: 'Ada Admin', company: 'Acme Construction', role: 'admin' },
  { email: 'manager@acme.test', name: 'Max Manager', company: 'Acme Construction', role: 'manager' },
  { email: 'member@acme.test', name: 'Mia Member', company: 'Acme Construction', role: 'member' },
  { email: 'admin@globex.test', name: 'Gus Admin', company: 'Globex Builders', role: 'admin' },
  { email: 'member@globex.test', name: 'Gil Member', company: 'Globex Builders', role: 'member' }
] as const

/**
 * Seeds two demo companies with users, projects and stock, once: a database that already has
 * a company is left alone. Returns whether it seeded.
 */
export async function seedIfEmpty (prisma: PrismaClient): Promise<boolean> {
  if (await prisma.company.count() > 0) return false
  const hashes = await Promise.all(DEMO_USERS.map(() => hashPassword(DEMO_PASSWORD)))
  await prisma.$transaction(async (tx) => {
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
  })
  return true
}
