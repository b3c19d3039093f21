// Dumps llama.cpp's logits for a token sequence, so tests can compare ggtrain's forward with it.
// usage: llama_logits MODEL TOKENS.i32 OUT.f32 N_LAST THREADS [LORA SCALE]...
//   TOKENS.i32: little-endian int32 token ids, evaluated as one sequence from position 0
//   OUT.f32:    float32 logits of the last N_LAST positions, row-major (N_LAST, n_vocab)
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char ** argv) {
    if (argc < 6 || (argc - 6) % 2 != 0) {
        fprintf(stderr, "usage: %s MODEL TOKENS.i32 OUT.f32 N_LAST THREADS [LORA SCALE]...\n", argv[0]);
        return 2;
    }
    const int n_last = atoi(argv[4]);
    const int n_threads = atoi(argv[5]);

    FILE * f = fopen(argv[2], "rb");
    if (!f) { fprintf(stderr, "cannot open %s\n", argv[2]); return 1; }
    std::vector<llama_token> tokens;
    int32_t t;
    while (fread(&t, sizeof(t), 1, f) == 1) tokens.push_back(t);
    fclose(f);
    const int n = (int) tokens.size();
    if (n < 1 || n_last < 1 || n_last > n) { fprintf(stderr, "bad token count %d / n_last %d\n", n, n_last); return 1; }

    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "failed to load model %s\n", argv[1]); return 1; }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n;
    cp.n_batch = n;
    cp.n_ubatch = n;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    // f32 K/V cache: the default f16 cache rounds K and V, which is llama.cpp's noise, not the model's
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "failed to create context\n"); return 1; }

    std::vector<llama_adapter_lora *> adapters;
    std::vector<float> scales;
    for (int i = 6; i < argc; i += 2) {
        llama_adapter_lora * a = llama_adapter_lora_init(model, argv[i]);
        if (!a) { fprintf(stderr, "failed to load adapter %s\n", argv[i]); return 1; }
        adapters.push_back(a);
        scales.push_back((float) atof(argv[i + 1]));
    }
    if (!adapters.empty() && llama_set_adapters_lora(ctx, adapters.data(), adapters.size(), scales.data()) != 0) {
        fprintf(stderr, "failed to apply adapters\n");
        return 1;
    }

    llama_batch_ext * batch = llama_batch_ext_init(ctx);
    for (int i = 0; i < n; ++i) {
        const int32_t idx = llama_batch_ext_add_token(batch, 0, tokens[i]);
        const llama_pos pos = i;
        llama_batch_ext_set_pos(batch, idx, &pos);
        if (i >= n - n_last) llama_batch_ext_set_output_logits(batch, idx, true);
    }
    if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch) != 0) { fprintf(stderr, "decode failed\n"); return 1; }

    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * out = fopen(argv[3], "wb");
    if (!out) { fprintf(stderr, "cannot write %s\n", argv[3]); return 1; }
    for (int i = n - n_last; i < n; ++i) {
        const float * row = llama_get_logits_ith(ctx, i);
        if (!row) { fprintf(stderr, "no logits for position %d\n", i); return 1; }
        fwrite(row, sizeof(float), n_vocab, out);
    }
    fclose(out);
    llama_batch_ext_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
