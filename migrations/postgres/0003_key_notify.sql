-- Tell every ingest instance at once when a key or a customer's status changes,
-- so a revocation or suspension is honoured at the edge within a second.
-- The payload is the customer id; listeners reload that customer's keys.
CREATE FUNCTION apex_notify_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('apex_key_change', OLD.customer_id);
    ELSE
        PERFORM pg_notify('apex_key_change', NEW.customer_id);
    END IF;
    RETURN NULL;
END;
$$;

CREATE FUNCTION apex_notify_customer_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('apex_key_change', OLD.id);
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        PERFORM pg_notify('apex_key_change', NEW.id);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_keys_notify AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION apex_notify_key_change();
CREATE TRIGGER customers_notify AFTER UPDATE OR DELETE ON customers
    FOR EACH ROW EXECUTE FUNCTION apex_notify_customer_change();
