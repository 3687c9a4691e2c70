#!/usr/bin/env node
// Runs `prisma generate` offline. Prisma 7 looks for its native schema engine even though
// generate never executes it, and that binary cannot be downloaded here; pointing
// PRISMA_SCHEMA_ENGINE_BINARY at any existing file satisfies the lookup.
import { spawnSync } from 'node:child_process'
import { createRequire } from 'node:module'

const require = createRequire(import.meta.url)
const env = { ...process.env, PRISMA_HIDE_UPDATE_MESSAGE: '1', CHECKPOINT_DISABLE: '1' }
env.PRISMA_SCHEMA_ENGINE_BINARY ??= process.execPath
const cli = require.resolve('prisma/build/index.js')
const result = spawnSync(process.execPath, [cli, 'generate'], { stdio: 'inherit', env })
process.exit(result.status ?? 1)
