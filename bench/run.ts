/**
 * npm run bench [-- <scenario> ...] [--quick] [--reps N] [--cpu-prof] [--list] [--<flag> value]
 *
 * Runs each scenario against our server and the raw Socket.IO baseline in the same run,
 * prints a summary line per headline figure and a table, and writes bench/results/<time>.json.
 */
import { mkdirSync, writeFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { killAllChildren } from './lib/child.ts'
import { now } from './lib/clock.ts'
import { Context } from './lib/context.ts'
import { machine, openFilesLimit } from './lib/machine.ts'
import type { Row, ScenarioResult } from './lib/scenario.ts'
import { round } from './lib/stats.ts'
import { scenarios } from './scenarios/index.ts'

const RESULTS = fileURLToPath(new URL('./results/', import.meta.url))
/** The whole default run must end well inside 8 minutes; this is the hard stop. */
const RUN_DEADLINE_MS = Number(process.env.BENCH_DEADLINE_MS ?? 12 * 60_000)

function parseArgs (argv: string[]) {
  const names: string[] = []
  const flags: Record<string, string | boolean> = {}
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!
    if (!arg.startsWith('--')) { names.push(arg); continue }
    const [key, inline] = arg.slice(2).split('=', 2) as [string, string | undefined]
    if (inline !== undefined) flags[key] = inline
    else if (argv[i + 1] !== undefined && !argv[i + 1]!.startsWith('--') && !['quick', 'cpu-prof', 'list', 'help', 'bare-baseline', 'plain-emit', 'trace', 'redis'].includes(key)) flags[key] = argv[++i]!
    else flags[key] = true
  }
  return { names, flags }
}

const fmt = (value: number) => {
  if (!Number.isFinite(value)) return String(value)
  const abs = Math.abs(value)
  return String(abs >= 1000 ? Math.round(value) : abs >= 100 ? round(value, 0) : abs >= 10 ? round(value, 1) : round(value, 2))
}

const ratioOf = (row: Row) => row.ours / row.baseline

function verdict (row: Row): { text: string, met?: boolean } {
  const t = row.target
  if (!t) return { text: '' }
  if (row.noVerdict) return { text: t.maxRatio !== undefined ? `≤ ${t.maxRatio}x` : t.minRatio !== undefined ? `≥ ${t.minRatio}x` : `< ${t.maxOurs} ${row.unit}` }
  const ratio = ratioOf(row)
  if (t.maxRatio !== undefined) return { text: `≤ ${t.maxRatio}x`, met: ratio <= t.maxRatio }
  if (t.minRatio !== undefined) return { text: `≥ ${t.minRatio}x`, met: ratio >= t.minRatio }
  if (t.maxOurs !== undefined) return { text: `< ${t.maxOurs} ${row.unit}`, met: row.ours < t.maxOurs }
  return { text: '' }
}

function summaryLine (row: Row): string {
  const v = verdict(row)
  const target = v.text ? ` (target ${v.text}: ${row.noVerdict ? `no verdict, ${row.noVerdict}` : v.met ? 'met' : 'MISSED'})` : ''
  return `${row.label}: ${row.metric} ${fmt(row.ours)} ${row.unit} vs ${fmt(row.baseline)} ${row.unit} ${row.baselineName ?? 'raw'} = ${round(ratioOf(row), 2)}x${target}`
}

function table (rows: Row[]): string {
  const header = ['scenario', 'metric', 'ours', 'baseline', 'ratio', 'target', '']
  const body = rows.map(row => {
    const v = verdict(row)
    return [row.label, row.metric, `${fmt(row.ours)} ${row.unit}`, `${fmt(row.baseline)} ${row.unit} (${row.baselineName ?? 'raw'})`, `${round(ratioOf(row), 2)}x`, v.text, row.noVerdict ? 'no verdict' : v.met === undefined ? '' : v.met ? 'met' : 'MISSED']
  })
  const widths = header.map((h, i) => Math.max(h.length, ...body.map(r => r[i]!.length)))
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`
  return [line(header), `|${widths.map(w => '-'.repeat(w + 2)).join('|')}|`, ...body.map(line)].join('\n')
}

/** The scenario running now: its databases are dropped even when the run is interrupted. */
let active: Context | undefined

async function main () {
  const { names, flags } = parseArgs(process.argv.slice(2))
  // Read by every child process (lib/trace.ts): fanout's slowest changes and what each process was doing.
  if (flags.trace) process.env.BENCH_TRACE = '1'
  if (flags.list || flags.help) {
    console.log('scenarios (default run marked *):')
    for (const s of Object.values(scenarios)) console.log(`  ${s.default ? '*' : ' '} ${s.name.padEnd(10)} ${s.description}\n      flags: ${s.flags}`)
    console.log('flags of every scenario: --quick (small sizes)  --reps N (default 5)  --cpu-prof (profiles in bench/results/prof/)')
    return
  }
  const unknown = names.filter(n => !scenarios[n])
  if (unknown.length) throw new Error(`unknown scenario ${unknown.join(', ')}; known: ${Object.keys(scenarios).join(', ')}`)
  const selected = names.length ? names : Object.values(scenarios).filter(s => s.default).map(s => s.name)
  const reps = Math.max(1, Number(flags.reps ?? 5) || 5)
  const quick = Boolean(flags.quick)
  const cpuProf = flags['cpu-prof'] ? `${RESULTS}prof` : undefined
  mkdirSync(cpuProf ?? RESULTS, { recursive: true })

  const limit = openFilesLimit()
  if (limit !== null && limit < 12_000) {
    console.warn(`warning: open-files limit (ulimit -n) is ${limit}; the connect scenario holds 10,000 sockets per server process and 5,000 per client process. Raise it (ulimit -n 20000) or pass --connections.`)
  }

  const started = now()
  const info = await machine()
  console.log(`bench: ${selected.join(', ')}${quick ? ' (quick)' : ''}, ${reps} reps; ${info.machine.cpuModel} x${info.machine.cpuCount}, ${round(info.machine.totalMemoryBytes / 2 ** 30, 1)} GiB, node ${info.machine.node}, load ${info.machine.loadAverage.map(l => round(l, 2)).join(' ')}`)

  const results: Array<{ name: string, durationSeconds: number, error?: string } & Partial<ScenarioResult>> = []
  for (const name of selected) {
    // Only the default run has a time bound; named scenarios and --reps run every repetition.
    const budgetMs = names.length === 0 && flags.reps === undefined ? (scenarios[name]!.budgetSeconds ?? Infinity) * 1000 : undefined
    const ctx = new Context(name, { quick, reps, budgetMs, flags, cpuProf, log: (m) => console.log(`  ${m}`) })
    active = ctx
    const t = now()
    console.log(`\n== ${name}: ${scenarios[name]!.description}`)
    try {
      const result = await scenarios[name]!.run(ctx)
      result.notes = [...result.notes ?? [], ...ctx.notes]
      results.push({ name, durationSeconds: round((now() - t) / 1000, 1), ...result })
      for (const row of result.rows.filter(r => r.summary)) console.log(summaryLine(row))
      for (const note of result.notes ?? []) console.log(`  note: ${note}`)
    } catch (err) {
      console.error(`${name} failed: ${(err as Error).stack ?? err}`)
      results.push({ name, durationSeconds: round((now() - t) / 1000, 1), error: (err as Error).message })
      process.exitCode = 1
    } finally {
      await ctx.cleanup()
      active = undefined
    }
  }

  const rows = results.flatMap(r => r.rows ?? [])
  console.log(`\n${table(rows)}\n`)
  console.log('summary:')
  for (const row of rows.filter(r => r.summary)) console.log(`  ${summaryLine(row)}`)
  for (const note of results.flatMap(r => r.notes ?? [])) console.log(`  note: ${note}`)

  const stamp = new Date().toISOString().replace(/[:.]/g, '-')
  const file = `${RESULTS}${stamp}-${selected.join('+')}${quick ? '-quick' : ''}.json`
  writeFileSync(file, JSON.stringify({
    schema: 1,
    command: `npm run bench -- ${process.argv.slice(2).join(' ')}`.trim(),
    startedAt: new Date(started).toISOString(),
    durationSeconds: round((now() - started) / 1000, 1),
    options: { scenarios: selected, quick, reps, flags },
    ...info,
    loadAverageEnd: (await import('node:os')).loadavg(),
    scenarios: results.map(r => ({
      ...r,
      rows: r.rows?.map(row => ({ ...row, ratio: ratioOf(row), ...(() => { const v = verdict(row); return { targetText: v.text || null, met: v.met ?? null } })() }))
    }))
  }, null, 2))
  console.log(`results: ${file} (${round((now() - started) / 1000, 0)} s)`)
}

// Children never outlive the run: killed on exit, on signals and at the hard deadline; the
// running scenario's databases are dropped (at most 5 s) before the process exits with `code`.
function stopNow (code: number): void {
  killAllChildren()
  const drop = active?.cleanup() ?? Promise.resolve()
  const timer = setTimeout(() => process.exit(code), 5000)
  drop.finally(() => { clearTimeout(timer); process.exit(code) })
}
process.on('exit', killAllChildren)
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.once(signal, () => {
    console.error(`\n${signal}: stopping bench processes, dropping bench databases`)
    stopNow(130)
  })
}
const hardStop = setTimeout(() => {
  console.error(`bench: run exceeded ${RUN_DEADLINE_MS / 1000} s; stopping`)
  stopNow(2)
}, RUN_DEADLINE_MS)
hardStop.unref()

main().then(() => {
  clearTimeout(hardStop)
  process.exit()
}, (err) => {
  console.error(err instanceof Error ? err.message : err)
  killAllChildren()
  process.exit(1)
})
