-- AlterTable
ALTER TABLE "idempotency_records" ADD COLUMN     "committedAt" TIMESTAMP(3),
ADD COLUMN     "lockedUntil" TIMESTAMP(3),
ADD COLUMN     "token" TEXT;

-- erp-idempotency's fence: every eventLog write of a request that claimed an Idempotency-Key
-- calls this in its own transaction. It marks the claim committed, and raises (the write then
-- commits nothing) when the claim is no longer this request's: another request took it over
-- after `recoverAfterMs`. SQLSTATE ERPTO: taken over.
CREATE FUNCTION "erp_claim_commit"(p_company_id TEXT, p_user_id TEXT, p_key TEXT, p_token TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  UPDATE "idempotency_records" SET "committedAt" = COALESCE("committedAt", clock_timestamp() AT TIME ZONE 'UTC')
  WHERE "companyId" = p_company_id AND "userId" = p_user_id AND "key" = p_key AND "token" = p_token;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'This Idempotency-Key was taken over by a later request' USING ERRCODE = 'ERPTO';
  END IF;
  RETURN TRUE;
END
$$;
