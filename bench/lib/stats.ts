/**
 * A log-bucketed latency histogram (1 % wide buckets from 1 µs): mergeable across client
 * processes, small over IPC, percentiles within 1 % of the exact value; min/max are exact.
 */
const BASE = 1.01
const LOG_BASE = Math.log(BASE)
const FLOOR_MS = 0.001

export interface HistogramJSON {
  buckets: Array<[number, number]>
  count: number
  min: number
  max: number
  sum: number
}

export interface Percentiles {
  count: number
  min: number
  p50: number
  p95: number
  p99: number
  max: number
  mean: number
}

export class Histogram {
  private counts = new Map<number, number>()
  count = 0
  min = Infinity
  max = -Infinity
  sum = 0

  record (ms: number): void {
    const index = ms <= FLOOR_MS ? 0 : Math.ceil(Math.log(ms / FLOOR_MS) / LOG_BASE)
    this.counts.set(index, (this.counts.get(index) ?? 0) + 1)
    this.count++
    this.sum += ms
    if (ms < this.min) this.min = ms
    if (ms > this.max) this.max = ms
  }

  merge (other: Histogram | HistogramJSON): this {
    const json = other instanceof Histogram ? other.toJSON() : other
    for (const [index, n] of json.buckets) this.counts.set(index, (this.counts.get(index) ?? 0) + n)
    this.count += json.count
    this.sum += json.sum
    if (json.count > 0) {
      this.min = Math.min(this.min, json.min)
      this.max = Math.max(this.max, json.max)
    }
    return this
  }

  /** The value at quantile q (0..1): the upper edge of its bucket, clamped to [min, max]. */
  quantile (q: number): number {
    if (this.count === 0) return NaN
    const rank = Math.max(1, Math.ceil(q * this.count))
    let seen = 0
    for (const index of [...this.counts.keys()].sort((a, b) => a - b)) {
      seen += this.counts.get(index)!
      if (seen >= rank) return Math.min(this.max, Math.max(this.min, FLOOR_MS * BASE ** index))
    }
    return this.max
  }

  percentiles (): Percentiles {
    return {
      count: this.count,
      min: this.count ? this.min : NaN,
      p50: this.quantile(0.5),
      p95: this.quantile(0.95),
      p99: this.quantile(0.99),
      max: this.count ? this.max : NaN,
      mean: this.count ? this.sum / this.count : NaN
    }
  }

  toJSON (): HistogramJSON {
    return { buckets: [...this.counts], count: this.count, min: this.min, max: this.max, sum: this.sum }
  }

  static from (json: HistogramJSON): Histogram {
    return new Histogram().merge(json)
  }
}

export function median (values: number[]): number {
  const sorted = values.filter(v => Number.isFinite(v)).sort((a, b) => a - b)
  if (sorted.length === 0) return NaN
  const mid = sorted.length >> 1
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2
}

/** Exact percentiles of a small sample (per-operation timings). */
export function samplePercentiles (values: number[]): Percentiles {
  const h = new Histogram()
  for (const v of values) h.record(v)
  return { ...h.percentiles(), p50: median(values) }
}

export const round = (value: number, digits = 2): number =>
  Number.isFinite(value) ? Number(value.toFixed(digits)) : value
