-- erp-auth's membership check inside a write statement (routes configured with
-- `erpAuth: { membership: 'in-write' }`, through `eventLog.commit({ guard })`). It raises instead
-- of answering, so the statement that calls it commits nothing for a caller who is not an active
-- member of the company, or whose stored role is not one of p_roles (NULL: any role).
-- Returns the role as stored. SQLSTATE ERPNM: not a member; ERPFB: role not allowed.
CREATE FUNCTION "erp_require_member"(p_user_id TEXT, p_company_id TEXT, p_roles TEXT[]) RETURNS TEXT
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  stored TEXT;
BEGIN
  SELECT m."role"::TEXT INTO stored
  FROM "memberships" m JOIN "users" u ON u."id" = m."userId"
  WHERE m."userId" = p_user_id AND m."companyId" = p_company_id AND u."active";
  IF stored IS NULL THEN
    RAISE EXCEPTION 'User is not an active member of this company' USING ERRCODE = 'ERPNM';
  END IF;
  IF p_roles IS NOT NULL AND NOT (stored = ANY (p_roles)) THEN
    RAISE EXCEPTION '%', stored USING ERRCODE = 'ERPFB';
  END IF;
  RETURN stored;
END
$$;
