-- Query side of search: what people type -> tsquery, with typo correction.
CREATE EXTENSION IF NOT EXISTS fuzzystrmatch;

-- Is b the same word as a with one typo (insert, delete, substitute, or swap of two letters)?
CREATE OR REPLACE FUNCTION edge_one_typo(a text, b text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
    RETURN levenshtein_less_equal(a, b, 2) <= 1
        OR (length(a) = length(b)
            AND levenshtein_less_equal(a, b, 2) = 2
            AND (SELECT string_agg(c, '' ORDER BY c) FROM regexp_split_to_table(a, '') c)
              = (SELECT string_agg(c, '' ORDER BY c) FROM regexp_split_to_table(b, '') c));

-- Each typed word becomes a term: joined like the indexed words ("AC/DC" -> acdc), the last one
-- a prefix (search as you type), and a word of 5+ letters the catalog does not know is OR'ed with
-- its nearest known word within one typo (trigram KNN over search_words, then edit distance).
CREATE OR REPLACE FUNCTION edge_search_query(q text) RETURNS tsquery
    LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    words text[];
    w text;
    best text;
    term text;
    terms text[] := '{}';
    i integer := 0;
BEGIN
    words := array(SELECT x FROM regexp_split_to_table(edge_fold(coalesce(q, '')), '\s+') AS x
                   WHERE x <> '');
    FOREACH w IN ARRAY words LOOP
        i := i + 1;
        w := regexp_replace(w, '[^[:alnum:]]+', '', 'g');
        CONTINUE WHEN w = '';
        term := quote_literal(w);
        IF i = cardinality(words) AND length(w) >= 3 THEN
            term := term || ':*';
        END IF;
        IF length(w) >= 5 AND NOT EXISTS (SELECT 1 FROM search_words WHERE word = w) THEN
            SELECT c.word INTO best
            FROM (SELECT word FROM search_words ORDER BY word <-> w LIMIT 8) AS c
            WHERE edge_one_typo(c.word, w)
            ORDER BY levenshtein(c.word, w), c.word
            LIMIT 1;
            IF best IS NOT NULL THEN
                term := '(' || term || ' | ' || quote_literal(best) || ')';
            END IF;
        END IF;
        terms := terms || term;
    END LOOP;
    IF cardinality(terms) = 0 THEN
        RETURN NULL;
    END IF;
    RETURN to_tsquery('simple', array_to_string(terms, ' & '));
END $$;
