// One implementation for tests and benchmarks: see test/helpers.ts.
export { dropRedisPrefix } from '../../test/helpers.ts'
