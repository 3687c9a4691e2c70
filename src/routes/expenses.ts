import type { FastifyInstance, FastifyRequest } from 'fastify'
import { z } from 'zod'
import { Errors } from '../../plugins/errors.ts'
import { companyStream, storable, userStream } from '../../plugins/events.ts'
import { idParams, listQuery, parse, requireRole, rowId, text } from './common.ts'

const createBody = z.object({
  amountMinor: z.number().int().min(1).max(2_000_000_000),
  currency: z.string().regex(/^[A-Z]{3}$/, 'must be an ISO 4217 code like EUR'),
  description: text(2000),
  projectId: rowId.optional()
}).strict()
const rejectBody = z.object({ reason: storable(z.string().trim().max(2000)).optional() }).strict()
const listExpensesQuery = listQuery.extend({ status: z.enum(['submitted', 'approved', 'rejected']).optional() })
// Who may approve or reject: checked before the handler and again, as stored, before the commit.
const DECIDERS = ['manager', 'admin'] as const

export async function expenseRoutes (fastify: FastifyInstance) {
  fastify.addHook('preHandler', fastify.authenticate)

  fastify.get('/expenses', async (request) => {
    const { limit, offset, status } = parse(listExpensesQuery, request.query)
    const expenses = await fastify.prisma.expense.findMany({
      where: { companyId: request.user.companyId, ...(status ? { status } : {}) },
      orderBy: [{ createdAt: 'asc' }, { id: 'asc' }],
      take: limit,
      skip: offset
    })
    return { expenses }
  })

  fastify.post('/expenses', async (request, reply) => {
    const body = parse(createBody, request.body)
    const { companyId, userId } = request.user
    const expense = await fastify.eventLog.transaction(async (tx, publish) => {
      // FOR KEY SHARE (the foreign-key check's own lock, taken now): a concurrent DELETE
      // /projects/:id (which locks the row FOR UPDATE to detach the project's expenses) then runs
      // wholly before this check (404) or after this commit (and detaches this expense too),
      // never in between with a foreign-key error; a PATCH of the project does not wait for it.
      if (body.projectId && (await tx.$queryRaw<unknown[]>`
        SELECT 1 FROM projects WHERE id = ${body.projectId} AND "companyId" = ${companyId} FOR KEY SHARE`).length === 0) {
        throw new Errors.NOT_FOUND('Project')
      }
      const expense = await tx.expense.create({ data: { ...body, companyId, submitterId: userId } })
      await fastify.conflicts.snapshot(tx, 'expense', expense)
      await publish({ stream: companyStream(companyId), type: 'expense:submitted', companyId, actorId: userId, data: { expense } })
      return expense
    }, { guard: fastify.erpAuth.writeGuard(request) })
    reply.code(201)
    return { expense }
  })

  fastify.get('/expenses/:id', async (request) => {
    const { id } = parse(idParams, request.params)
    const expense = await fastify.prisma.expense.findFirst({ where: { id, companyId: request.user.companyId } })
    if (!expense) throw new Errors.NOT_FOUND('Expense')
    return { expense }
  })

  // submitted → approved | rejected; the conditional update makes a second decision a 409.
  const decide = (action: 'approve' | 'reject') => async (request: FastifyRequest) => {
    requireRole(request, ...DECIDERS)
    const { id } = parse(idParams, request.params)
    const { reason } = action === 'reject' ? parse(rejectBody, request.body) : { reason: undefined }
    const { companyId, userId } = request.user
    const status = action === 'approve' ? 'approved' : 'rejected'
    const expense = await fastify.eventLog.transaction(async (tx, publish) => {
      const { count } = await tx.expense.updateMany({
        where: { id, companyId, status: 'submitted' },
        data: { status, approverId: userId, decidedAt: new Date(), reason: reason ?? null, version: { increment: 1 } }
      })
      const expense = await tx.expense.findFirst({ where: { id, companyId } })
      if (!expense) throw new Errors.NOT_FOUND('Expense')
      if (count === 0) throw new Errors.INVALID_TRANSITION(action, expense.status)
      await fastify.conflicts.snapshot(tx, 'expense', expense)
      await publish({ stream: companyStream(companyId), type: `expense:${status}`, companyId, actorId: userId, data: { expense } })
      // A user stream follows the person across companies: someone who has left this company
      // (or was deactivated) is not told about its expenses any more.
      if (await fastify.erpAuth.membership(expense.submitterId, companyId, tx) === null) return expense
      await publish({
        stream: userStream(expense.submitterId),
        type: 'notification:new',
        companyId,
        actorId: userId,
        data: {
          kind: `expense:${status}`,
          message: `Your expense "${expense.description}" was ${status}${reason ? `: ${reason}` : ''}`,
          ref: { type: 'expense', id: expense.id }
        }
      })
      return expense
    }, { guard: fastify.erpAuth.writeGuard(request, DECIDERS) })
    return { expense }
  }
  fastify.post('/expenses/:id/approve', decide('approve'))
  fastify.post('/expenses/:id/reject', decide('reject'))
}
