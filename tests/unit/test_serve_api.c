/* test_serve_api.c - the JSON layer of `numoe serve` on strings: requests of
 * the four kinds parsed (every field, defaults, null as absent) and refused
 * (every class of error with its status and param), response bodies and
 * stream chunks parsed back with cJSON and checked field by field, and the
 * streaming reasoning split checked against nm_chat_split_reasoning for many
 * ways of cutting the same text. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "coordinator/serve/api.h"
#include "tests/unit/check.h"

#define OAI_CHAT NM_API_OPENAI_CHAT
#define OAI_COMP NM_API_OPENAI_COMPLETION
#define OLL_CHAT NM_API_OLLAMA_CHAT
#define OLL_GEN NM_API_OLLAMA_GENERATE

/* ---- helpers ---- */

static nm_sampler_params defaults(void) {
    nm_sampler_params p = nm_sampler_params_default();
    p.seed = 7;
    return p;
}

/* parses JSON that must be accepted; r is filled (free it) */
static int parse_ok(nm_api_kind kind, const char *json, nm_api_request *r, int line) {
    nm_api_error e = {0};
    nm_sampler_params d = defaults();
    int rc = nm_api_parse(kind, json, strlen(json), &d, r, &e);
    if (rc) fprintf(stderr, "line %d: unexpected error %d %s [%s]: %s\n", line, e.status, e.type, e.param, e.message);
    return rc;
}
#define PARSE_OK(kind, json, r) CHECK(parse_ok(kind, json, r, __LINE__) == 0, "%s", json)

/* JSON that must be refused with 400 and param */
static void expect_err(nm_api_kind kind, const char *json, const char *param, const char *msg_part, int line) {
    nm_api_request r;
    nm_api_error e = {0};
    nm_sampler_params d = defaults();
    int rc = nm_api_parse(kind, json, strlen(json), &d, &r, &e);
    CHECK(rc == -1, "line %d: accepted %s", line, json);
    CHECK(e.status == 400 && !strcmp(e.type, "invalid_request_error"), "line %d: %s: status %d type %s", line, json,
          e.status, e.type);
    CHECK(!strcmp(e.param, param), "line %d: %s: param '%s', want '%s' (%s)", line, json, e.param, param, e.message);
    CHECK(e.message[0], "line %d: empty message", line);
    if (msg_part) CHECK(strstr(e.message, msg_part), "line %d: %s: message '%s' lacks '%s'", line, json, e.message, msg_part);
    CHECK(r.msgs == NULL && r.model == NULL && r.prompt == NULL && r.stops == NULL, "line %d: not freed", line);
    nm_api_request_free(&r); /* safe after a failure */
}
#define ERR(kind, json, param) expect_err(kind, json, param, NULL, __LINE__)
#define ERRM(kind, json, param, msg) expect_err(kind, json, param, msg, __LINE__)

/* cJSON value at a path like "choices/0/message/content"; NULL if missing */
static const cJSON *jp(const cJSON *root, const char *path) {
    char buf[256];
    snprintf(buf, sizeof buf, "%s", path);
    const cJSON *v = root;
    for (char *save = NULL, *k = strtok_r(buf, "/", &save); k && v; k = strtok_r(NULL, "/", &save))
        v = cJSON_IsArray(v) ? cJSON_GetArrayItem(v, atoi(k)) : cJSON_GetObjectItemCaseSensitive(v, k);
    return v;
}
static int jstr(const cJSON *root, const char *path, const char *want) {
    const cJSON *v = jp(root, path);
    return cJSON_IsString(v) && !strcmp(v->valuestring, want);
}
static int jnum(const cJSON *root, const char *path, double want) {
    const cJSON *v = jp(root, path);
    return cJSON_IsNumber(v) && v->valuedouble == want;
}
static int jnull(const cJSON *root, const char *path) { return cJSON_IsNull(jp(root, path)); }
static int jsize(const cJSON *root, const char *path) {
    const cJSON *v = jp(root, path);
    return v ? cJSON_GetArraySize(v) : -1;
}

/* renders and parses back; *raw keeps the text (free both) */
static cJSON *render(nm_api_kind kind, int stream, const nm_api_out *o, char **raw) {
    *raw = nm_api_render(kind, stream, o);
    CHECK(*raw, "render returned NULL");
    cJSON *j = *raw ? cJSON_Parse(*raw) : NULL;
    CHECK(j, "render gave invalid JSON: %s", *raw ? *raw : "(null)");
    return j;
}

/* ---- parsing: accepted requests ---- */

static void test_parse_openai_chat_all_fields(void) {
    const char *body =
        "{\"model\":\"ds\",\"messages\":[{\"role\":\"system\",\"content\":\"be brief\"},"
        "{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"\"},"
        "{\"role\":\"developer\",\"content\":\"dev\"},{\"role\":\"tool\",\"content\":\"42\",\"tool_call_id\":\"x\"},"
        "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"text\",\"text\":\"b\"}]},"
        "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"c\"}]},"
        "{\"role\":\"user\",\"content\":\"\"}],"
        "\"stream\":true,\"stream_options\":{\"include_usage\":true},\"max_tokens\":100,"
        "\"temperature\":0,\"top_p\":0.5,\"top_k\":40.0,\"min_p\":0.1,\"seed\":1234,\"stop\":[\"\\n\\n\",\"END\"],"
        "\"presence_penalty\":-1.5,\"frequency_penalty\":2,\"repeat_penalty\":1.1,\"repeat_last_n\":32,"
        "\"n\":1,\"ignore_eos\":true,\"tools\":[],\"user\":\"u\",\"logit_bias\":null}";
    nm_api_request r;
    PARSE_OK(OAI_CHAT, body, &r);
    CHECK(r.kind == OAI_CHAT && r.model && !strcmp(r.model, "ds"), "model");
    CHECK(r.n_msgs == 8, "n_msgs %zu", r.n_msgs);
    if (r.n_msgs == 8) {
        CHECK(!strcmp(r.msgs[0].role, "system") && !strcmp(r.msgs[0].content, "be brief"), "msg 0");
        CHECK(!strcmp(r.msgs[1].role, "user") && !strcmp(r.msgs[1].content, "hi"), "msg 1");
        CHECK(!strcmp(r.msgs[2].role, "assistant") && !strcmp(r.msgs[2].content, ""), "empty assistant");
        CHECK(!strcmp(r.msgs[3].role, "system") && !strcmp(r.msgs[3].content, "dev"), "developer -> system");
        CHECK(!strcmp(r.msgs[4].role, "tool") && !strcmp(r.msgs[4].content, "42"), "tool role");
        CHECK(!strcmp(r.msgs[5].role, "user") && !strcmp(r.msgs[5].content, "a\nb"), "parts joined: '%s'",
              r.msgs[5].content);
        CHECK(!strcmp(r.msgs[6].role, "assistant") && !strcmp(r.msgs[6].content, ""),
              "tool-call assistant without content");
        CHECK(!strcmp(r.msgs[7].role, "user") && !strcmp(r.msgs[7].content, ""), "empty user content");
    }
    CHECK(r.stream == 1 && r.include_usage == 1 && r.ignore_eos == 1, "flags");
    CHECK(r.max_tokens == 100, "max_tokens %lld", (long long)r.max_tokens);
    CHECK(r.sampling.temp == 0.0f && r.sampling.top_p == 0.5f && r.sampling.top_k == 40 &&
              r.sampling.min_p == 0.1f, "sampling");
    CHECK(r.sampling.presence_penalty == -1.5f && r.sampling.frequency_penalty == 2.0f &&
              r.sampling.repeat_penalty == 1.1f && r.sampling.penalty_last_n == 32, "penalties");
    CHECK(r.has_seed && r.sampling.seed == 1234, "seed");
    CHECK(r.n_stops == 2 && !strcmp(r.stops[0], "\n\n") && !strcmp(r.stops[1], "END"), "stops");
    CHECK(r.prompt == NULL && r.system == NULL && !r.load_only, "no prompt");
    nm_api_request_free(&r);
    nm_api_request_free(&r); /* twice is safe */
}

static void test_parse_defaults_and_nulls(void) {
    nm_api_request r;
    nm_sampler_params d = defaults();
    PARSE_OK(OAI_CHAT,
             " {\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"model\":null,\"temperature\":null,"
             "\"stream\":null,\"max_tokens\":null,\"seed\":null,\"stop\":null,\"n\":null,\"stream_options\":null} \n",
             &r);
    CHECK(r.model == NULL && r.stream == 0 && r.include_usage == 0 && r.max_tokens == -1, "absent");
    CHECK(!memcmp(&r.sampling, &d, sizeof d), "defaults kept");
    CHECK(!r.has_seed && r.n_stops == 0 && r.stops == NULL, "no seed / stops");
    nm_api_request_free(&r);

    PARSE_OK(OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"seed\":-1,\"stop\":\"###\","
                       "\"max_tokens\":5,\"max_completion_tokens\":9}", &r);
    CHECK(!r.has_seed && r.sampling.seed == 7, "seed -1 = server's seed");
    CHECK(r.n_stops == 1 && !strcmp(r.stops[0], "###"), "stop string");
    CHECK(r.max_tokens == 9, "max_completion_tokens wins: %lld", (long long)r.max_tokens);
    nm_api_request_free(&r);

    PARSE_OK(OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"seed\":-5,\"stop\":[]}", &r);
    CHECK(r.has_seed && r.sampling.seed == (uint64_t)-5, "negative seed modulo 2^64");
    CHECK(r.n_stops == 0, "empty stop array");
    nm_api_request_free(&r);

    /* NULL defaults: the sampler's own */
    nm_api_error e;
    const char *b = "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}";
    nm_sampler_params sd = nm_sampler_params_default();
    CHECK(nm_api_parse(OAI_CHAT, b, strlen(b), NULL, &r, &e) == 0 && !memcmp(&r.sampling, &sd, sizeof sd) &&
              r.sampling.temp == 0.8f && !r.has_seed,
          "NULL defaults");
    nm_api_request_free(&r);

    /* the body need not be NUL-terminated: only len bytes are read */
    char *nb = malloc(strlen(b));
    memcpy(nb, b, strlen(b));
    CHECK(nm_api_parse(OAI_CHAT, nb, strlen(b), NULL, &r, &e) == 0, "unterminated body");
    nm_api_request_free(&r);
    free(nb);
}

static void test_parse_completion(void) {
    nm_api_request r;
    PARSE_OK(OAI_COMP, "{\"model\":\"m\",\"prompt\":\"Once upon\",\"max_tokens\":16,\"stream\":false}", &r);
    CHECK(r.prompt && !strcmp(r.prompt, "Once upon") && r.max_tokens == 16 && r.msgs == NULL && !r.stream, "prompt");
    nm_api_request_free(&r);
    PARSE_OK(OAI_COMP, "{\"prompt\":[\"one\"]}", &r);
    CHECK(r.prompt && !strcmp(r.prompt, "one"), "array of one string");
    nm_api_request_free(&r);
    PARSE_OK(OAI_COMP, "{\"prompt\":\"\"}", &r);
    CHECK(r.prompt && !strcmp(r.prompt, ""), "empty prompt is allowed");
    nm_api_request_free(&r);
}

static void test_parse_ollama(void) {
    nm_api_request r;
    PARSE_OK(OLL_CHAT,
             "{\"model\":\"ds:latest\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\",\"images\":[]}],"
             "\"options\":{\"num_predict\":64,\"temperature\":1.5,\"top_k\":10,\"top_p\":0.9,\"min_p\":0,"
             "\"seed\":99,\"stop\":[\"<|x|>\"],\"repeat_penalty\":1.2,\"presence_penalty\":0.5,"
             "\"frequency_penalty\":0.25,\"repeat_last_n\":128,\"num_ctx\":4096,\"mirostat\":0},"
             "\"keep_alive\":\"5m\",\"format\":\"\"}",
             &r);
    CHECK(r.model && !strcmp(r.model, "ds:latest") && r.stream == 1, "model, stream default true");
    CHECK(r.n_msgs == 1 && !strcmp(r.msgs[0].content, "hi"), "messages");
    CHECK(r.max_tokens == 64 && r.sampling.temp == 1.5f && r.sampling.top_k == 10 && r.sampling.top_p == 0.9f &&
              r.sampling.min_p == 0 && r.has_seed && r.sampling.seed == 99,
          "options");
    CHECK(r.sampling.repeat_penalty == 1.2f && r.sampling.presence_penalty == 0.5f &&
              r.sampling.frequency_penalty == 0.25f && r.sampling.penalty_last_n == 128, "option penalties");
    CHECK(r.n_stops == 1 && !strcmp(r.stops[0], "<|x|>") && !r.load_only, "option stop");
    nm_api_request_free(&r);

    PARSE_OK(OLL_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stream\":false,"
                       "\"options\":{\"num_predict\":-1}}", &r);
    CHECK(r.stream == 0 && r.max_tokens == -1, "num_predict -1 = no limit");
    nm_api_request_free(&r);
    PARSE_OK(OLL_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                       "\"options\":{\"num_predict\":-2}}", &r);
    CHECK(r.max_tokens == -1, "num_predict -2 = no limit");
    nm_api_request_free(&r);

    PARSE_OK(OLL_GEN, "{\"model\":\"m\",\"prompt\":\"Why?\",\"system\":\"sys\",\"raw\":true,\"options\":null}", &r);
    CHECK(r.prompt && !strcmp(r.prompt, "Why?") && r.system && !strcmp(r.system, "sys") && r.raw == 1 &&
              r.stream == 1 && !r.load_only, "generate");
    nm_api_request_free(&r);

    /* Ollama's preload requests */
    PARSE_OK(OLL_GEN, "{\"model\":\"m\"}", &r);
    CHECK(r.load_only && r.prompt && !strcmp(r.prompt, ""), "generate without prompt = load");
    nm_api_request_free(&r);
    PARSE_OK(OLL_CHAT, "{\"model\":\"m\",\"messages\":[]}", &r);
    CHECK(r.load_only && r.n_msgs == 0, "chat without messages = load");
    nm_api_request_free(&r);
    PARSE_OK(OLL_GEN, "{\"model\":\"m\",\"system\":\"s\"}", &r);
    CHECK(!r.load_only, "a system prompt alone is a request");
    nm_api_request_free(&r);
}

/* ---- parsing: refused requests ---- */

static void test_parse_errors_body(void) {
    ERRM(OAI_CHAT, "{\"messages\":", "", "malformed JSON");
    ERRM(OAI_CHAT, "", "", "empty");
    ERR(OAI_CHAT, "   ", "");
    ERRM(OAI_CHAT, "[1]", "", "JSON object");
    ERR(OAI_CHAT, "\"hi\"", "");
    ERRM(OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]} {}", "", "extra text");
    ERR(OLL_CHAT, "{'model':'m'}", "");
}

static void test_parse_errors_messages(void) {
    ERRM(OAI_CHAT, "{}", "messages", "required");
    ERR(OAI_CHAT, "{\"messages\":\"hi\"}", "messages");
    ERRM(OAI_CHAT, "{\"messages\":[]}", "messages", "at least one");
    ERR(OAI_CHAT, "{\"messages\":[1]}", "messages[0]");
    ERR(OAI_CHAT, "{\"messages\":[{\"content\":\"x\"}]}", "messages[0].role");
    ERR(OAI_CHAT, "{\"messages\":[{\"role\":7,\"content\":\"x\"}]}", "messages[0].role");
    ERR(OAI_CHAT, "{\"messages\":[{\"role\":\"user\"}]}", "messages[0].content");
    ERR(OAI_CHAT, "{\"messages\":[{\"role\":\"assistant\"}]}", "messages[0].content");
    ERR(OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":null}]}", "messages[0].content");
    ERRM(OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"wizard\",\"content\":\"x\"}]}",
         "messages[1].role", "unknown role \"wizard\"");
    ERR(OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":5}]}", "messages[0].content");
    ERR(OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":{\"text\":\"x\"}}]}", "messages[0].content");
    ERRM(OAI_CHAT,
         "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
         "{\"type\":\"image_url\",\"image_url\":{\"url\":\"x\"}}]}]}",
         "messages[0].content[1].type", "image_url");
    ERR(OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":5}]}]}",
        "messages[0].content[0].text");
    ERR(OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":[\"x\"]}]}", "messages[0].content[0]");
    ERR(OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"text\":\"x\"}]}]}", "messages[0].content[0].type");
}

static void test_parse_errors_fields(void) {
#define M "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
    ERRM(OAI_CHAT, "{" M "\"temperature\":\"hot\"}", "temperature", "must be a number");
    ERR(OAI_CHAT, "{" M "\"temperature\":2.5}", "temperature");
    ERR(OAI_CHAT, "{" M "\"temperature\":-0.1}", "temperature");
    ERR(OAI_CHAT, "{" M "\"temperature\":1e400}", "temperature");
    ERR(OAI_CHAT, "{" M "\"top_p\":1.01}", "top_p");
    ERR(OAI_CHAT, "{" M "\"top_p\":-1}", "top_p");
    ERR(OAI_CHAT, "{" M "\"top_k\":-1}", "top_k");
    ERR(OAI_CHAT, "{" M "\"top_k\":2.5}", "top_k");
    ERR(OAI_CHAT, "{" M "\"top_k\":1e30}", "top_k");
    ERR(OAI_CHAT, "{" M "\"min_p\":1.5}", "min_p");
    ERR(OAI_CHAT, "{" M "\"min_p\":true}", "min_p");
    ERR(OAI_CHAT, "{" M "\"max_tokens\":0}", "max_tokens");
    ERR(OAI_CHAT, "{" M "\"max_tokens\":-3}", "max_tokens");
    ERRM(OAI_CHAT, "{" M "\"max_tokens\":1.5}", "max_tokens", "integer");
    ERRM(OAI_CHAT, "{" M "\"max_tokens\":\"10\"}", "max_tokens", "got a string");
    ERR(OAI_CHAT, "{" M "\"max_tokens\":1e30}", "max_tokens");
    ERR(OAI_CHAT, "{" M "\"max_tokens\":-1e30}", "max_tokens");
    ERR(OAI_CHAT, "{" M "\"max_tokens\":1e999}", "max_tokens");
    ERR(OAI_CHAT, "{" M "\"max_completion_tokens\":0}", "max_completion_tokens");
    ERRM(OAI_CHAT, "{" M "\"stream\":\"yes\"}", "stream", "boolean");
    ERR(OAI_CHAT, "{" M "\"stream\":1}", "stream");
    ERR(OAI_CHAT, "{" M "\"stream_options\":true}", "stream_options");
    ERR(OAI_CHAT, "{" M "\"stream_options\":{\"include_usage\":1}}", "stream_options.include_usage");
    ERRM(OAI_CHAT, "{" M "\"n\":2}", "n", "n = 1");
    ERR(OAI_CHAT, "{" M "\"n\":0}", "n");
    ERR(OAI_CHAT, "{" M "\"n\":1.5}", "n");
    ERR(OAI_CHAT, "{" M "\"seed\":1.5}", "seed");
    ERR(OAI_CHAT, "{" M "\"seed\":\"42\"}", "seed");
    ERR(OAI_CHAT, "{" M "\"seed\":1e30}", "seed");
    ERR(OAI_CHAT, "{" M "\"stop\":5}", "stop");
    ERR(OAI_CHAT, "{" M "\"stop\":[\"a\",1]}", "stop");
    ERR(OAI_CHAT, "{" M "\"stop\":\"\"}", "stop");
    ERRM(OAI_CHAT, "{" M "\"stop\":[\"a\",\"\"]}", "stop", "empty");
    ERRM(OAI_CHAT,
         "{" M "\"stop\":[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\",\"10\",\"11\",\"12\",\"13\",\"14\","
         "\"15\",\"16\",\"17\"]}",
         "stop", "at most 16");
    ERR(OAI_CHAT, "{" M "\"presence_penalty\":3}", "presence_penalty");
    ERR(OAI_CHAT, "{" M "\"frequency_penalty\":-2.5}", "frequency_penalty");
    ERR(OAI_CHAT, "{" M "\"repeat_penalty\":0}", "repeat_penalty");
    ERR(OAI_CHAT, "{" M "\"repeat_penalty\":-1}", "repeat_penalty");
    ERR(OAI_CHAT, "{" M "\"repeat_penalty\":1e300}", "repeat_penalty");
    ERR(OAI_CHAT, "{" M "\"repeat_last_n\":-1}", "repeat_last_n");
    ERR(OAI_CHAT, "{" M "\"model\":5}", "model");
    ERR(OAI_CHAT, "{" M "\"ignore_eos\":\"true\"}", "ignore_eos");
#undef M
    /* a 17-stop array at the limit + 1 passes at the limit */
    nm_api_request r;
    PARSE_OK(OAI_COMP, "{\"prompt\":\"p\",\"stop\":[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\",\"10\","
                       "\"11\",\"12\",\"13\",\"14\",\"15\",\"16\"]}", &r);
    CHECK(r.n_stops == 16 && !strcmp(r.stops[15], "16"), "16 stops");
    nm_api_request_free(&r);
}

static void test_parse_errors_completion(void) {
    ERRM(OAI_COMP, "{}", "prompt", "required");
    ERRM(OAI_COMP, "{\"prompt\":[1,2,3]}", "prompt", "token-id prompts are not supported");
    ERRM(OAI_COMP, "{\"prompt\":[[1,2],[3]]}", "prompt", "token-id prompts are not supported");
    ERRM(OAI_COMP, "{\"prompt\":[\"a\",\"b\"]}", "prompt", "exactly one");
    ERR(OAI_COMP, "{\"prompt\":[]}", "prompt");
    ERR(OAI_COMP, "{\"prompt\":5}", "prompt");
    ERR(OAI_COMP, "{\"prompt\":[null]}", "prompt");
    ERR(OAI_COMP, "{\"prompt\":\"x\",\"max_tokens\":0}", "max_tokens");
}

static void test_parse_errors_ollama(void) {
    ERRM(OLL_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", "model", "model is required");
    ERRM(OLL_GEN, "{\"prompt\":\"x\"}", "model", "model is required");
    ERRM(OLL_GEN, "{\"model\":\"\",\"prompt\":\"x\"}", "model", "model is required");
    ERR(OLL_GEN, "{\"model\":5,\"prompt\":\"x\"}", "model");
    ERR(OLL_CHAT, "{\"model\":\"m\",\"messages\":\"hi\"}", "messages");
    ERR(OLL_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"x\"}]}]}",
        "messages[0].content");
    ERR(OLL_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\",\"images\":[\"AAAA\"]}]}",
        "messages[0].images");
    ERR(OLL_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"bot\",\"content\":\"x\"}]}", "messages[0].role");
    ERR(OLL_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stream\":\"yes\"}", "stream");
    ERR(OLL_GEN, "{\"model\":\"m\",\"prompt\":\"x\",\"options\":\"fast\"}", "options");
    ERR(OLL_GEN, "{\"model\":\"m\",\"prompt\":\"x\",\"options\":{\"temperature\":\"hot\"}}", "options.temperature");
    ERR(OLL_GEN, "{\"model\":\"m\",\"prompt\":\"x\",\"options\":{\"num_predict\":1.5}}", "options.num_predict");
    ERR(OLL_GEN, "{\"model\":\"m\",\"prompt\":\"x\",\"options\":{\"num_predict\":1e30}}", "options.num_predict");
    ERRM(OLL_GEN, "{\"model\":\"m\",\"prompt\":\"x\",\"options\":{\"repeat_last_n\":-1}}", "options.repeat_last_n",
         "not supported");
    ERR(OLL_GEN, "{\"model\":\"m\",\"prompt\":\"x\",\"options\":{\"stop\":[7]}}", "options.stop");
    ERR(OLL_GEN, "{\"model\":\"m\",\"prompt\":\"x\",\"options\":{\"top_k\":-2}}", "options.top_k");
    ERR(OLL_GEN, "{\"model\":\"m\",\"prompt\":\"x\",\"options\":{\"seed\":0.5}}", "options.seed");
    ERR(OLL_GEN, "{\"model\":\"m\",\"prompt\":5}", "prompt");
    ERR(OLL_GEN, "{\"model\":\"m\",\"prompt\":\"x\",\"system\":[]}", "system");
    ERR(OLL_GEN, "{\"model\":\"m\",\"prompt\":\"x\",\"raw\":\"yes\"}", "raw");
    ERR(OLL_GEN, "{\"model\":\"m\",\"prompt\":\"x\",\"images\":[\"AAAA\"]}", "images");
}

/* ---- rendering ---- */

static nm_api_out base_out(void) {
    nm_api_out o = {0};
    o.id = "chatcmpl-abc", o.model = "deepseek-r1", o.created = 1700000000;
    o.prompt_tokens = 5, o.completion_tokens = 7;
    return o;
}

static void test_render_openai_chat(void) {
    nm_api_out o = base_out();
    o.content = "Hi \"there\"\n", o.content_len = strlen(o.content);
    o.reasoning = "hmm", o.reasoning_len = 3, o.finish = "length";
    char *raw;
    cJSON *j = render(OAI_CHAT, 0, &o, &raw);
    CHECK(jstr(j, "id", "chatcmpl-abc") && jstr(j, "object", "chat.completion") && jnum(j, "created", 1700000000) &&
              jstr(j, "model", "deepseek-r1"), "head: %s", raw);
    CHECK(jsize(j, "choices") == 1 && jnum(j, "choices/0/index", 0), "choices");
    CHECK(jstr(j, "choices/0/message/role", "assistant") && jstr(j, "choices/0/message/content", "Hi \"there\"\n") &&
              jstr(j, "choices/0/message/reasoning_content", "hmm"), "message: %s", raw);
    CHECK(jnull(j, "choices/0/logprobs") && jstr(j, "choices/0/finish_reason", "length"), "finish");
    CHECK(jnum(j, "usage/prompt_tokens", 5) && jnum(j, "usage/completion_tokens", 7) && jnum(j, "usage/total_tokens", 12),
          "usage");
    cJSON_Delete(j), free(raw);

    /* no reasoning, no text: content is still a string, finish defaults to stop */
    o = base_out();
    j = render(OAI_CHAT, 0, &o, &raw);
    CHECK(jstr(j, "choices/0/message/content", "") && !jp(j, "choices/0/message/reasoning_content") &&
              jstr(j, "choices/0/finish_reason", "stop"), "%s", raw);
    cJSON_Delete(j), free(raw);

    /* stream: first chunk */
    o = base_out();
    o.first = 1;
    j = render(OAI_CHAT, 1, &o, &raw);
    CHECK(jstr(j, "object", "chat.completion.chunk") && jstr(j, "choices/0/delta/role", "assistant") &&
              jstr(j, "choices/0/delta/content", "") && jnull(j, "choices/0/finish_reason") &&
              jnull(j, "choices/0/logprobs") && !jp(j, "usage"), "first chunk: %s", raw);
    cJSON_Delete(j), free(raw);
    /* a content chunk, a reasoning chunk */
    o = base_out();
    o.content = "tok", o.content_len = 3;
    j = render(OAI_CHAT, 1, &o, &raw);
    CHECK(jstr(j, "choices/0/delta/content", "tok") && !jp(j, "choices/0/delta/role") &&
              !jp(j, "choices/0/delta/reasoning_content") && jnull(j, "choices/0/finish_reason"), "%s", raw);
    cJSON_Delete(j), free(raw);
    o = base_out();
    o.reasoning = "why", o.reasoning_len = 3;
    j = render(OAI_CHAT, 1, &o, &raw);
    CHECK(jstr(j, "choices/0/delta/reasoning_content", "why") && !jp(j, "choices/0/delta/content"), "%s", raw);
    cJSON_Delete(j), free(raw);
    /* the last chunk: empty delta, a reason */
    o = base_out();
    o.finish = "stop";
    j = render(OAI_CHAT, 1, &o, &raw);
    CHECK(cJSON_IsObject(jp(j, "choices/0/delta")) && jsize(j, "choices/0/delta") == 0 &&
              jstr(j, "choices/0/finish_reason", "stop"), "%s", raw);
    cJSON_Delete(j), free(raw);
    /* the usage chunk */
    o = base_out();
    o.with_usage = 1;
    j = render(OAI_CHAT, 1, &o, &raw);
    CHECK(cJSON_IsArray(jp(j, "choices")) && jsize(j, "choices") == 0 && jnum(j, "usage/prompt_tokens", 5) &&
              jnum(j, "usage/completion_tokens", 7) && jnum(j, "usage/total_tokens", 12) &&
              jstr(j, "object", "chat.completion.chunk"),
          "usage chunk: %s", raw);
    cJSON_Delete(j), free(raw);
}

static void test_render_openai_completion(void) {
    nm_api_out o = base_out();
    o.id = "cmpl-1", o.content = " there", o.content_len = 6, o.finish = "stop";
    char *raw;
    cJSON *j = render(OAI_COMP, 0, &o, &raw);
    CHECK(jstr(j, "id", "cmpl-1") && jstr(j, "object", "text_completion") && jstr(j, "choices/0/text", " there") &&
              jnum(j, "choices/0/index", 0) && jnull(j, "choices/0/logprobs") &&
              jstr(j, "choices/0/finish_reason", "stop") && jnum(j, "usage/total_tokens", 12), "%s", raw);
    cJSON_Delete(j), free(raw);
    o.finish = NULL;
    j = render(OAI_COMP, 1, &o, &raw);
    CHECK(jstr(j, "object", "text_completion") && jstr(j, "choices/0/text", " there") &&
              jnull(j, "choices/0/finish_reason") && !jp(j, "usage"), "chunk: %s", raw);
    cJSON_Delete(j), free(raw);
    o = base_out();
    o.with_usage = 1;
    j = render(OAI_COMP, 1, &o, &raw);
    CHECK(jsize(j, "choices") == 0 && jnum(j, "usage/prompt_tokens", 5) && jnum(j, "usage/completion_tokens", 7) &&
              jnum(j, "usage/total_tokens", 12) && jstr(j, "object", "text_completion"),
          "usage chunk: %s", raw);
    cJSON_Delete(j), free(raw);
}

static void test_render_ollama(void) {
    nm_api_out o = base_out();
    o.created_nsec = 123;
    o.content = "Hel", o.content_len = 3;
    char *raw;
    cJSON *j = render(OLL_CHAT, 1, &o, &raw);
    CHECK(jstr(j, "model", "deepseek-r1") && jstr(j, "created_at", "2023-11-14T22:13:20.000000123Z") &&
              jstr(j, "message/role", "assistant") && jstr(j, "message/content", "Hel") && !jp(j, "message/thinking") &&
              cJSON_IsFalse(jp(j, "done")) && !jp(j, "done_reason") && !jp(j, "eval_count"), "line: %s", raw);
    cJSON_Delete(j), free(raw);

    o = base_out();
    o.reasoning = "think", o.reasoning_len = 5;
    j = render(OLL_CHAT, 1, &o, &raw);
    CHECK(jstr(j, "message/thinking", "think") && jstr(j, "message/content", ""), "thinking line: %s", raw);
    cJSON_Delete(j), free(raw);

    o = base_out();
    o.finish = "length", o.total_ns = 123456789012345678LL, o.prompt_ns = 1000, o.eval_ns = 2000;
    j = render(OLL_CHAT, 1, &o, &raw);
    CHECK(cJSON_IsTrue(jp(j, "done")) && jstr(j, "done_reason", "length") && jnum(j, "load_duration", 0) &&
              jnum(j, "prompt_eval_count", 5) && jnum(j, "prompt_eval_duration", 1000) && jnum(j, "eval_count", 7) &&
              jnum(j, "eval_duration", 2000) && jstr(j, "message/content", ""), "final: %s", raw);
    CHECK(strstr(raw, "\"total_duration\":123456789012345678"), "int64 printed exactly: %s", raw);
    cJSON_Delete(j), free(raw);

    /* non-streamed: the final object with the whole text */
    o = base_out();
    o.content = "All of it.", o.content_len = 10, o.reasoning = "r", o.reasoning_len = 1;
    j = render(OLL_GEN, 0, &o, &raw);
    CHECK(jstr(j, "response", "All of it.") && jstr(j, "thinking", "r") && cJSON_IsTrue(jp(j, "done")) &&
              jstr(j, "done_reason", "stop") && !jp(j, "message") && jnum(j, "eval_count", 7), "generate: %s", raw);
    cJSON_Delete(j), free(raw);
    o = base_out();
    o.content = "x", o.content_len = 1;
    j = render(OLL_GEN, 1, &o, &raw);
    CHECK(jstr(j, "response", "x") && cJSON_IsFalse(jp(j, "done")) && !jp(j, "thinking"), "generate line: %s", raw);
    cJSON_Delete(j), free(raw);
    /* the answer to a preload */
    o = base_out();
    o.finish = "load";
    j = render(OLL_GEN, 0, &o, &raw);
    CHECK(jstr(j, "done_reason", "load") && jstr(j, "response", ""), "load: %s", raw);
    cJSON_Delete(j), free(raw);
}

static void test_render_escaping(void) {
    /* NUL, control bytes, quote, backslash, an invalid byte, a cut sequence, é */
    static const char txt[] = "a\0b\x01\"\\\n\t\xff\xc3\xa9<\xe2\x82";
    nm_api_out o = base_out();
    o.content = txt, o.content_len = sizeof txt - 1;
    char *raw;
    cJSON *j = render(OAI_CHAT, 0, &o, &raw);
    CHECK(raw && strstr(raw, "\"content\":\"a\\u0000b\\u0001\\\"\\\\\\n\\t\\ufffd\xc3\xa9<\\ufffd\\ufffd\""),
          "escaped: %s", raw);
    cJSON_Delete(j), free(raw);
    /* strings a model cannot produce still come out as JSON cJSON reads back */
    o = base_out();
    o.content = "\xed\xa0\x80\xf4\x90\x80\x80\xc0\xaf ok", o.content_len = strlen(o.content);
    j = render(OLL_CHAT, 0, &o, &raw);
    CHECK(jstr(j, "message/content",
               "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd ok"),
          "surrogate / > U+10FFFF / overlong replaced per byte: %s", raw);
    cJSON_Delete(j), free(raw);
}

static void test_models_tags_errors(void) {
    char *raw = nm_api_models_json("deepseek-v3", 1700000001);
    cJSON *j = raw ? cJSON_Parse(raw) : NULL;
    CHECK(jstr(j, "object", "list") && jsize(j, "data") == 1 && jstr(j, "data/0/id", "deepseek-v3") &&
              jstr(j, "data/0/object", "model") && jnum(j, "data/0/created", 1700000001) &&
              jstr(j, "data/0/owned_by", "numoe"), "models: %s", raw);
    cJSON_Delete(j), free(raw);

    raw = nm_api_tags_json("deepseek-v3:latest", 404430000000LL, "deepseek2", "Q4_K", "671B", "2024-05-01T10:00:00Z");
    j = raw ? cJSON_Parse(raw) : NULL;
    CHECK(jsize(j, "models") == 1 && jstr(j, "models/0/name", "deepseek-v3:latest") &&
              jstr(j, "models/0/model", "deepseek-v3:latest") && jstr(j, "models/0/modified_at", "2024-05-01T10:00:00Z") &&
              jnum(j, "models/0/size", 404430000000.0) && jstr(j, "models/0/digest", ""), "tags: %s", raw);
    CHECK(jstr(j, "models/0/details/format", "gguf") && jstr(j, "models/0/details/family", "deepseek2") &&
              jsize(j, "models/0/details/families") == 1 && jstr(j, "models/0/details/families/0", "deepseek2") &&
              jstr(j, "models/0/details/parameter_size", "671B") &&
              jstr(j, "models/0/details/quantization_level", "Q4_K"), "details: %s", raw);
    cJSON_Delete(j), free(raw);
    raw = nm_api_tags_json("m", 1, NULL, NULL, NULL, NULL);
    j = raw ? cJSON_Parse(raw) : NULL;
    CHECK(jstr(j, "models/0/modified_at", "1970-01-01T00:00:00Z") && jstr(j, "models/0/details/family", ""), "NULLs: %s",
          raw);
    cJSON_Delete(j), free(raw);

    nm_api_error e;
    nm_api_errorf(&e, 400, "invalid_request_error", "messages", "bad \"%s\"", "x");
    raw = nm_api_error_json(&e, 0);
    j = raw ? cJSON_Parse(raw) : NULL;
    CHECK(jstr(j, "error/message", "bad \"x\"") && jstr(j, "error/type", "invalid_request_error") &&
              jstr(j, "error/param", "messages") && jnull(j, "error/code"), "openai error: %s", raw);
    cJSON_Delete(j), free(raw);
    nm_api_errorf(&e, 404, "not_found_error", "", "no such model");
    raw = nm_api_error_json(&e, 0);
    j = raw ? cJSON_Parse(raw) : NULL;
    CHECK(jnull(j, "error/param") && jstr(j, "error/type", "not_found_error"), "param null: %s", raw);
    cJSON_Delete(j), free(raw);
    raw = nm_api_error_json(&e, 1);
    CHECK(raw && !strcmp(raw, "{\"error\":\"no such model\"}"), "ollama error: %s", raw);
    free(raw);

    char t[48];
    CHECK(!strcmp(nm_api_time_rfc3339(0, 0, t, sizeof t), "1970-01-01T00:00:00.000000000Z"), "%s", t);
    CHECK(!strcmp(nm_api_time_rfc3339(1704067199, 999999999, t, sizeof t), "2023-12-31T23:59:59.999999999Z"), "%s", t);
}

/* ---- streaming reasoning split ---- */

typedef struct {
    char r[512], a[512];
    size_t rn, an;
} split_text;

/* What the stream must add up to: nm_chat_split_reasoning of the whole text,
 * except that bytes cut off inside a tag at the very end are kept (coordinator/serve/api.h). */
static void ref_split(const char *t, size_t len, int started, split_text *out) {
    nm_chat_reasoning s;
    nm_chat_split_reasoning(t, len, started, &s);
    out->rn = out->an = 0;
    if (!s.has_reasoning && s.answer_len == 0 && len > 0) { /* "  <thi" at the end: text */
        memcpy(out->a, t, len), out->an = len;
        return;
    }
    if (s.has_reasoning && s.thinking) { /* close it to see the reasoning with any "</thi" tail kept */
        char buf[1024];
        memcpy(buf, t, len), memcpy(buf + len, "</think>", 8);
        nm_chat_split_reasoning(buf, len + 8, started, &s);
        memcpy(out->r, s.reasoning, s.reasoning_len), out->rn = s.reasoning_len;
        return;
    }
    memcpy(out->r, s.reasoning, s.reasoning_len), out->rn = s.reasoning_len;
    memcpy(out->a, s.answer, s.answer_len), out->an = s.answer_len;
}

/* Feeds text cut at cuts[0..n) (increasing, each <= len; repeats allowed),
 * then the whole text with final = 1; each call sees a fresh copy of exactly
 * the bytes so far, so ASan catches any read past them. */
static void stream_split(const char *t, size_t len, int started, const size_t *cuts, int n, split_text *out) {
    nm_reasoning_stream s = {.started_in_think = started};
    out->rn = out->an = 0;
    for (int i = 0; i <= n; i++) {
        size_t l = i < n ? cuts[i] : len;
        char *copy = malloc(l ? l : 1);
        memcpy(copy, t, l);
        const char *r, *a;
        size_t rl, al;
        nm_reasoning_stream_feed(&s, copy, l, i == n, &r, &rl, &a, &al);
        if (rl) CHECK(r >= copy && r + rl <= copy + l, "reasoning view outside the text");
        if (al) CHECK(a >= copy && a + al <= copy + l, "answer view outside the text");
        if (out->rn + rl <= sizeof out->r) memcpy(out->r + out->rn, r, rl);
        if (out->an + al <= sizeof out->a) memcpy(out->a + out->an, a, al);
        out->rn += rl, out->an += al;
        free(copy);
    }
}

static int same_split(const split_text *x, const split_text *y) {
    return x->rn == y->rn && x->an == y->an && !memcmp(x->r, y->r, x->rn) && !memcmp(x->a, y->a, x->an);
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(uint32_t n) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng % n);
}

/* every way of cutting one text that this test tries; returns failures */
static int check_text(const char *t, size_t len, int started) {
    split_text want, got;
    ref_split(t, len, started, &want);
    size_t cuts[600] = {0};
    int fails = 0;
#define TRY(n)                                                                                   \
    do {                                                                                         \
        stream_split(t, len, started, cuts, (n), &got);                                          \
        if (!same_split(&got, &want) && fails++ == 0)                                            \
            fprintf(stderr, "split of \"%.*s\" (started %d): got [%.*s|%.*s] want [%.*s|%.*s]\n", \
                    (int)len, t, started, (int)got.rn, got.r, (int)got.an, got.a, (int)want.rn,  \
                    want.r, (int)want.an, want.a);                                               \
    } while (0)
    TRY(0); /* all at once */
    for (size_t k = 0; k <= len; k++) { /* two pieces, at every point (k == len: a final call with nothing new) */
        cuts[0] = k;
        TRY(1);
    }
    for (size_t k = 0; k < len; k++) cuts[k] = k + 1; /* byte by byte */
    TRY((int)len);
    for (int trial = 0; trial < 40; trial++) { /* random pieces, empty ones included */
        int n = 0;
        for (size_t at = 0; at < len && n < 590;) {
            at += rnd(5);
            if (at > len) at = len;
            cuts[n++] = at;
        }
        TRY(n);
    }
#undef TRY
    return fails;
}

static void test_reasoning_stream_texts(void) {
    static const char *const texts[] = {
        "<think>\nI think so.\n</think>\n\nThe answer is 4.",
        "  <think>abc</think>answer",
        "no think here",
        "  leading space answer  ",
        "<think>\n\n  </think>  \n\n  only answer  \n",
        "<think>reasoning without close   \n",
        "reasoning when started</think>answer",
        "\n</think>\n\nanswer",
        "<think>a </thi b </think> c",
        "<think><think></think></think>",
        "<thinking>not a tag",
        "<<think>x",
        "",
        "   \n",
        "<think>x</think>",
        "<think>x</think>   ",
        "<think>\xce\xb1 \xce\xb2</think>\xc3\xbcn\xc3\xaf" "code",
        "<think>abc</think></think>tail",
        "plain reasoning only",
        "<think>abc<</think>x",
        "\t\r\n<think> a\n</think>\t b\n",
        "</think>",
        "a</think",
        "<think>abc</thi",  /* ends inside the tag: kept as reasoning */
        "  <thi",           /* ends inside the open tag: kept as answer */
        "<think",
        "<think>",
    };
    int fails = 0, cases = 0;
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++)
        for (int started = 0; started < 2; started++, cases++) fails += check_text(texts[i], strlen(texts[i]), started);
    CHECK(fails == 0, "%d of %d texts split differently when streamed", fails, cases);
}

static void test_reasoning_stream_random(void) {
    static const char *const pieces[] = {"<think>", "</think>", "<", "</", "</th", "<thi", "th", "ink>", " ",
                                         "\n",      "a",        "bc", "\xc3\xa9", "\t", ">"};
    int fails = 0;
    for (int n = 0; n < 400; n++) {
        char t[256];
        size_t len = 0;
        for (int k = (int)rnd(14); k > 0; k--) {
            const char *p = pieces[rnd(sizeof pieces / sizeof *pieces)];
            memcpy(t + len, p, strlen(p)), len += strlen(p);
        }
        fails += check_text(t, len, (int)rnd(2));
    }
    CHECK(fails == 0, "%d random texts split differently when streamed", fails);
}

static void test_reasoning_stream_holdback(void) {
    /* nothing that might still become a tag or be trimmed is shown early */
    nm_reasoning_stream s = {0};
    const char *r, *a;
    size_t rl, al;
    const char *t = "  <thi";
    nm_reasoning_stream_feed(&s, t, strlen(t), 0, &r, &rl, &a, &al);
    CHECK(rl == 0 && al == 0, "a possible <think> is held");
    t = "  <think>\nabc \n</th";
    nm_reasoning_stream_feed(&s, t, strlen(t), 0, &r, &rl, &a, &al);
    CHECK(rl == 3 && !memcmp(r, "abc", 3) && al == 0, "reasoning shown without its tail: %.*s", (int)rl, r);
    t = "  <think>\nabc \n</think>\n";
    nm_reasoning_stream_feed(&s, t, strlen(t), 0, &r, &rl, &a, &al);
    CHECK(rl == 0 && al == 0, "leading answer whitespace held");
    t = "  <think>\nabc \n</think>\nHi ";
    nm_reasoning_stream_feed(&s, t, strlen(t), 0, &r, &rl, &a, &al);
    CHECK(rl == 0 && al == 3 && !memcmp(a, "Hi ", 3), "answer shown at once, trailing space included");
    nm_reasoning_stream_feed(&s, t, strlen(t), 1, &r, &rl, &a, &al);
    CHECK(rl == 0 && al == 0, "final call adds nothing");

    /* a plain answer streams immediately, leading whitespace included */
    nm_reasoning_stream p = {0};
    t = " Hello";
    nm_reasoning_stream_feed(&p, t, strlen(t), 0, &r, &rl, &a, &al);
    CHECK(al == 6 && !memcmp(a, " Hello", 6) && rl == 0, "plain answer not held");
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    RUN(test_parse_openai_chat_all_fields);
    RUN(test_parse_defaults_and_nulls);
    RUN(test_parse_completion);
    RUN(test_parse_ollama);
    RUN(test_parse_errors_body);
    RUN(test_parse_errors_messages);
    RUN(test_parse_errors_fields);
    RUN(test_parse_errors_completion);
    RUN(test_parse_errors_ollama);
    RUN(test_render_openai_chat);
    RUN(test_render_openai_completion);
    RUN(test_render_ollama);
    RUN(test_render_escaping);
    RUN(test_models_tags_errors);
    RUN(test_reasoning_stream_texts);
    RUN(test_reasoning_stream_random);
    RUN(test_reasoning_stream_holdback);
    return check_summary();
}
