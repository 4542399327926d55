-- Typo correction looked at the 8 nearest words by trigram distance only; a swapped or dropped
-- letter often moves the right word further down that list ("nihgt": "night" is 58th). Look at
-- more neighbours, keep those within one typo (a swap counts as one), most similar first.
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
            -- Up to five known words within one typo, most similar first: "smmer" may be
            -- "summer" or "smme", and the searcher should find either.
            SELECT string_agg(quote_literal(k.word), ' | ') INTO best
            FROM (SELECT c.word
                  FROM (SELECT word FROM search_words ORDER BY word <-> w LIMIT 100) AS c
                  WHERE length(c.word) BETWEEN length(w) - 1 AND length(w) + 1
                    AND edge_one_typo(c.word, w)
                  ORDER BY similarity(c.word, w) DESC, c.word
                  LIMIT 5) AS k;
            IF best IS NOT NULL THEN
                term := '(' || term || ' | ' || best || ')';
            END IF;
        END IF;
        terms := terms || term;
    END LOOP;
    IF cardinality(terms) = 0 THEN
        RETURN NULL;
    END IF;
    RETURN to_tsquery('simple', array_to_string(terms, ' & '));
END $$;
